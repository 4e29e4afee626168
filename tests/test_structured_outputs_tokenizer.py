"""The token bytes llguidance is given (structured_outputs/ll_tokenizer.py), against the
tokenizers library's own decoder, and grammars over added tokens that models write as text
(Qwen's <tool_call> and <think>: added, not special).
"""

import numpy as np
import pytest
import tokenizers

from pagedjax.structured_outputs import GrammarCompiler, StructuredOutputsParams
from pagedjax.structured_outputs.ll_tokenizer import token_bytes
from pagedjax.tokenizer import Tokenizer, _sentencepiece_bpe, load_tokenizer
from tests.tiny_tokenizer import make_test_tokenizer


def walk(compiler: GrammarCompiler, constraint: StructuredOutputsParams, seed: int, max_tokens: int = 200):
    """Random allowed tokens until EOS: (token ids, whether every one was accepted)."""
    rng = np.random.default_rng(seed)
    m = compiler.matcher(constraint)
    ids = []
    for _ in range(max_tokens):
        allowed = m.allowed_token_ids()
        t = int(rng.choice(allowed))
        assert m.accept_token(t), f"seed={seed}: allowed token {t} refused: {m.error}"
        if t in compiler.eos_token_ids:
            return ids
        ids.append(t)
    raise AssertionError(f"seed={seed}: no EOS in {max_tokens} tokens")


def test_byte_level_bytes_match_the_decoder():
    tok = load_tokenizer()  # SmolLM2: byte-level BPE, 49152 ids
    got = token_bytes(tok.backend)
    assert len(got) == tok.vocab_size
    checked = 0
    for i in range(tok.vocab_size):
        try:
            text = got[i].decode("utf-8")
        except UnicodeDecodeError:  # a piece of a character: the decoder cannot show it alone
            continue
        assert text == tok.decode([i], skip_special_tokens=False), i
        checked += 1
    assert checked > 0.9 * tok.vocab_size


def _tiny_sentencepiece(words: list[str]) -> Tokenizer:
    """A SentencePiece BPE as GGUF "llama" files hold one (the loader's converter): <unk> <s> </s>,
    256 byte tokens, the characters of `words` and every "▁" + prefix of each word."""
    chars = sorted({c for w in words for c in w} | {"\u2581"})
    pieces = sorted({"\u2581" + w[:k] for w in words for k in range(1, len(w) + 1)}, key=lambda p: (len(p), p))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + pieces
    scores = [0.0] * 259 + [-1000.0] * len(chars) + [-float(len(p)) for p in pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(pieces))
    backend = _sentencepiece_bpe(tokens, scores, types, add_space_prefix=True)
    backend.add_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in tokens[:3]])
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_byte_fallback():
    tok = _tiny_sentencepiece(["The", "capital", "is", "Paris"])
    assert tok.decode(tok.encode("Paris é", add_special_tokens=False)) == "Paris é"
    got = token_bytes(tok.backend)
    ids = dict(zip(tok.convert_ids_to_tokens(range(tok.vocab_size)), range(tok.vocab_size)))
    assert got[ids["<0xC3>"]] == b"\xc3" and got[ids["<0x41>"]] == b"A"
    assert got[ids["\u2581Paris"]] == b" Paris" and got[ids["\u2581"]] == b" "
    assert got[ids["</s>"]] == b"</s>"
    compiler = GrammarCompiler(tok)
    choices = ["The capital is Paris", "Paris é"]
    for seed in range(6):
        text = tok.decode(walk(compiler, StructuredOutputsParams(choice=choices), seed))
        assert text in choices, (seed, text)


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """The test tokenizer with <think>, </think>, <tool_call>, </tool_call> added as text tokens."""
    folder = tmp_path_factory.mktemp("tok")
    base = load_tokenizer(make_test_tokenizer(folder, 300))
    base.backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                             for t in ("<think>", "</think>", "<tool_call>", "</tool_call>")])
    return Tokenizer(base.backend, bos_token=base.bos_token, eos_token=base.eos_token, pad_token=base.pad_token)


def test_added_text_tokens_are_text(qwen_like):
    tok = qwen_like
    compiler = GrammarCompiler(tok, 320)
    think, end, call, end_call = tok.convert_tokens_to_ids(["<think>", "</think>", "<tool_call>", "</tool_call>"])
    assert token_bytes(tok.backend)[call] == b"<tool_call>"
    hermes = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    m = compiler.matcher(StructuredOutputsParams(choice=[hermes]))
    assert m.allowed_token_ids().tolist() == [call]  # the model's own token for the text
    for seed in range(4):
        ids = walk(compiler, StructuredOutputsParams(choice=[hermes]), seed)
        assert tok.decode(ids, skip_special_tokens=False) == hermes and call in ids and end_call in ids
        ids = walk(compiler, StructuredOutputsParams(regex=r"<think>[a-z]{1,4}</think>[0-9]{2}"), seed)
        assert ids[0] == think and end in ids, ids
    # A special token is not its text: "<|im_start|>" in a grammar is written with other tokens.
    m = compiler.matcher(StructuredOutputsParams(choice=["<|im_start|>"]))
    assert tok.bos_token_id not in m.allowed_token_ids()
