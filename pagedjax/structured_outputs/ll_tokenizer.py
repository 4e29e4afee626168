"""llguidance's view of a tokenizer: each token's bytes, which ones are special, and an encoder
(host only).

llguidance can read a `tokenizer.json` itself, but it then marks every added token as special
(its bytes behind a 0xFF marker), also the ones a model writes as ordinary text: Qwen's
`<tool_call>` and `<think>` are added tokens with special=false. Its masks then allow such a token
where the grammar wants the text "<tool_call>" (the encoder says so), and consuming it fails
("doesn't satisfy the grammar; forced bytes: got '<'"). So the bytes are given here, through
llguidance's TokenizerWrapper: an added token is its text, special only if the tokenizer says so.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

try:  # see backend.py: only constraints need it
    import llguidance as llg
except ImportError:  # pragma: no cover
    llg = None
import tokenizers


@functools.cache
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a token's name."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, chars)}


def _decoder_kind(backend: tokenizers.Tokenizer) -> tuple[str | None, str]:
    """("byte_level" | "byte_fallback" | None, the character that stands for a space)."""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    if decoder.get("type") == "ByteLevel":
        return "byte_level", " "
    kind, space = None, " "
    for d in decoder.get("decoders", []) if decoder.get("type") == "Sequence" else []:
        if d.get("type") == "ByteFallback":
            kind = "byte_fallback"
        elif d.get("type") == "Replace" and d.get("content") == " ":
            pattern = (d.get("pattern") or {}).get("String")
            if isinstance(pattern, str) and len(pattern) == 1:
                space = pattern
    return kind, space


def token_bytes(backend: tokenizers.Tokenizer) -> list[bytes] | None:
    """Each id's bytes (b"" for an id without any), or None for a tokenizer of another kind."""
    kind, space = _decoder_kind(backend)
    if kind is None:
        return None
    added = backend.get_added_tokens_decoder()
    chars = _byte_level_chars()
    out = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        if i in added:
            out.append(added[i].content.encode("utf-8"))
            continue
        name = backend.id_to_token(i)
        if name is None:
            out.append(b"")
        elif kind == "byte_level":
            try:
                out.append(bytes(chars[c] for c in name))
            except KeyError:  # not a byte-level name: never allowed
                out.append(b"")
        elif len(name) == 6 and name.startswith("<0x") and name.endswith(">"):
            out.append(bytes([int(name[3:5], 16)]))
        else:
            out.append(name.replace(space, " ").encode("utf-8"))
    return out


def _text_encoder(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy that encodes text in the middle of an output: SentencePiece's dummy prefix removed,
    and a special token's text read as text (the special token is never that text)."""
    spec = json.loads(backend.to_str())
    norm = spec.get("normalizer")
    if isinstance(norm, dict) and norm.get("type") == "Prepend":
        spec["normalizer"] = None
    elif isinstance(norm, dict) and norm.get("type") == "Sequence":
        norm["normalizers"] = [n for n in norm["normalizers"] if n.get("type") != "Prepend"]
    spec["padding"] = spec["truncation"] = None
    encoder = tokenizers.Tokenizer.from_str(json.dumps(spec))
    encoder.encode_special_tokens = True
    return encoder


class _Tokens:
    """What llguidance's TokenizerWrapper reads."""

    def __init__(self, backend: tokenizers.Tokenizer, tokens: list[bytes], special: list[int],
                 eos_token_id: int, bos_token_id: int | None):
        self.tokens, self.special_token_ids = tokens, special
        self.eos_token_id, self.bos_token_id = eos_token_id, bos_token_id
        self._encoder = _text_encoder(backend)

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")  # llguidance passes whole UTF-8 only
        return self._encoder.encode(text, add_special_tokens=False).ids


def ll_tokenizer(backend: tokenizers.Tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 bos_token_id: int | None = None) -> llg.LLTokenizer:
    """The llguidance tokenizer of `backend`, with `vocab_size` ids (the model's, >= the tokenizer's)."""
    tokens = token_bytes(backend)
    if tokens is None:  # neither byte-level nor byte-fallback: llguidance's own reading (or its error)
        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
        return llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {len(tokens)} ids")
    tokens += [b""] * (vocab_size - len(tokens))  # ids past the tokenizer's: no bytes, never allowed
    special = sorted(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    wrapper = llg.TokenizerWrapper(_Tokens(backend, tokens, special, eos_token_ids[0], bos_token_id))
    return llg.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=list(eos_token_ids))
