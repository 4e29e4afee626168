"""Tokenizers: loading (HF folder or GGUF file, torch-free), encode/decode, chat templates.

Incremental detokenization for streaming and stop strings live in pagedjax/detokenizer.py.

Host only: plain Python over `tokenizers`, jinja2 and numpy; never imports jax, torch or transformers.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from pagedjax.bundled import bundled_model_path
from pagedjax.gguf_file import read_gguf_metadata

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


# ------------------------------------------------------------------------------------------ facade


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template a model was trained with."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ):
        self.backend = backend
        self.special_tokens_map = {
            name: tok
            for name, tok in zip(_SPECIAL_NAMES, (bos_token, eos_token, unk_token, pad_token))
            if tok is not None
        }
        # Named special tokens missing from the added vocabulary are added, as transformers does.
        named = self.special_tokens_map.values()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named])
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = (
            self.special_tokens_map.get(n) for n in _SPECIAL_NAMES
        )
        self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id = (
            None if t is None else backend.token_to_id(t)
            for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token)
        )
        self.chat_template = chat_template
        # Every id that ends generation: eos plus generation_config's / GGUF's eot ids (Llama-3 <|eot_id|>).
        ids = [self.eos_token_id, *extra_eos_token_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in ids if i is not None))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, {self.special_tokens_map}, "
                f"chat_template={self.has_chat_template})")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (`len(hf_tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def all_special_ids(self) -> list[int]:
        """Ids of every special token (the named ones and added tokens marked special)."""
        ids = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        named = (self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id)
        ids |= {i for i in named if i is not None}
        return sorted(ids)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a leading BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]:
        return [self.backend.token_to_id(t) for t in tokens]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template the way transformers does; ids if `tokenize`."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("This tokenizer has no chat template; pass chat_template= or use a plain prompt.")
        if not messages:
            raise ValueError("Cannot apply a chat template to an empty conversation.")
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if continue_final_message:  # render with a marker after the last message, then cut there
            if not isinstance(messages[-1].get("content"), str):
                raise ValueError("continue_final_message needs the final message's content to be a string.")
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + tag}]
        try:
            text = _compile_chat_template(template).render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens_map, **kwargs},
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"Chat template error: {e}") from e
        if continue_final_message:
            if tag.strip() not in text:
                raise ValueError("continue_final_message: the chat template dropped the final message.")
            text = text[: text.rindex(tag.strip())]
        return self.encode(text, add_special_tokens=False) if tokenize else text


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def load_chat_template(value: str) -> str:
    """A chat template given as vLLM's `--chat-template` takes it: the path of a file holding one
    (a .jinja file), or the Jinja text itself. Checked here: it must parse."""
    path = Path(value).expanduser()
    is_text = any(tag in value for tag in ("{{", "{%"))
    if not is_text:
        if not path.is_file():
            raise ValueError(f"chat template {value!r}: no such file, and not a Jinja template either")
        value = path.read_text(encoding="utf-8")
    try:
        _compile_chat_template(value)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template {'' if is_text else str(path) + ' '}does not parse: {e}") from None
    return value


@functools.lru_cache(maxsize=32)
def _compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# ----------------------------------------------------------------------------------------- loading


def load_tokenizer(source: str | os.PathLike | None = None) -> Tokenizer:
    """Load the tokenizer of an HF model folder or a .gguf file (None: the bundled SmolLM2)."""
    path = Path(bundled_model_path() if source is None else source)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        has_hf = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
        ggufs = sorted(path.glob("*.gguf"))
        if not has_hf and len(ggufs) == 1:
            return _load_gguf(ggufs[0])
        return _load_hf_folder(path)
    raise ValueError(f"{path}: not an HF model folder or a .gguf file")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok  # str or a serialized AddedToken


def _as_ids(x: Any) -> list[int]:
    return [] if x is None else [x] if isinstance(x, int) else list(x)


def _load_hf_folder(path: Path) -> Tokenizer:
    cfg = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
    if (path / "tokenizer.json").is_file():
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab = _read_json(path / "vocab.json")
        lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(m.split(" ", 1)) for m in lines if m and not m.startswith("#version")]
        pre = pre_tokenizers.ByteLevel(add_prefix_space=cfg.get("add_prefix_space", False))
        backend = _byte_level_bpe(vocab, merges, pre)
        added = sorted((int(i), t) for i, t in cfg.get("added_tokens_decoder", {}).items())
        for _, t in added:
            backend.add_tokens([AddedToken(t["content"], special=t.get("special", False), normalized=False,
                                           lstrip=t.get("lstrip", False), rstrip=t.get("rstrip", False))])
        if "<|endoftext|>" in vocab:  # GPT-2's defaults (transformers' GPT2Tokenizer)
            for name in ("bos_token", "eos_token", "unk_token"):
                cfg.setdefault(name, "<|endoftext|>")
    else:
        raise ValueError(
            f"{path}: no tokenizer.json (or vocab.json + merges.txt). A SentencePiece-only folder "
            "(tokenizer.model) must be converted once: transformers' AutoTokenizer(...).save_pretrained(dir)."
        )
    specials = {name: _token_content(cfg.get(name)) for name in _SPECIAL_NAMES}
    model_cfg, gen_cfg = _read_json(path / "config.json"), _read_json(path / "generation_config.json")
    for name in ("bos_token", "eos_token", "pad_token"):  # fall back on the model config's ids
        ids = _as_ids(gen_cfg.get(f"{name}_id", model_cfg.get(f"{name}_id")))
        if specials[name] is None and ids:
            specials[name] = backend.id_to_token(ids[0])
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra_eos = _as_ids(gen_cfg.get("eos_token_id")) + _as_ids(model_cfg.get("eos_token_id"))
    return Tokenizer(backend, **specials, chat_template=template, extra_eos_token_ids=extra_eos)


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], pre, ignore_merges: bool = False):
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    return backend


# GGUF `tokenizer.ggml.pre` -> pre-tokenizer, following llama.cpp's llama-vocab.cpp regex table.
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_PRES = {"default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion", "granite-docling"}
_DIGITS_GPT2_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_LLAMA3_PRES = {"llama-bpe", "llama3", "dbrx", "smaug-bpe"}
_QWEN2_PRES = {"qwen2", "stablelm2", "hunyuan"}


def _gguf_pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_GPT2_PRES:  # digits split one by one, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_PRES or pre in _QWEN2_PRES:
        regex = _LLAMA3_RE if pre in _LLAMA3_PRES else _QWEN2_RE
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre not in _GPT2_PRES:
        warnings.warn(f"GGUF tokenizer.ggml.pre={pre!r} is not known here; using GPT-2's pre-tokenizer regex.")
    return byte_level


def _load_gguf(path: Path) -> Tokenizer:
    meta = read_gguf_metadata(path, prefix="tokenizer.")
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens", [])
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if kind in ("gpt2", "llama") and not tokens:
        raise ValueError(f"{path}: the GGUF has no tokenizer.ggml.tokens")
    if kind == "gpt2":  # byte-level BPE
        if "tokenizer.ggml.merges" not in meta:
            raise ValueError(f"{path}: a 'gpt2' GGUF tokenizer needs tokenizer.ggml.merges")
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        pre = meta.get("tokenizer.ggml.pre", "default")
        backend = _byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges, _gguf_pre_tokenizer(pre),
                                  ignore_merges=pre in _LLAMA3_PRES)
    elif kind == "llama":  # SentencePiece BPE
        if "tokenizer.ggml.scores" not in meta:
            raise ValueError(f"{path}: a 'llama' GGUF tokenizer needs tokenizer.ggml.scores")
        backend = _sentencepiece_bpe(tokens, meta["tokenizer.ggml.scores"], types,
                                     meta.get("tokenizer.ggml.add_space_prefix", True))
    else:
        raise ValueError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2', byte-level BPE, and "
            "'llama', SentencePiece BPE). Use the model's HF folder (tokenizer.json) instead."
        )
    # token_type 3 = control (special), 4 = user-defined (matched whole, but ordinary text)
    backend.add_tokens([AddedToken(t, special=ty == 3, normalized=False)
                        for t, ty in zip(tokens, types) if ty in (3, 4)])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    single = [*([bos] if meta.get("tokenizer.ggml.add_bos_token") and bos else []), "$A",
              *([eos] if meta.get("tokenizer.ggml.add_eos_token") and eos else [])]
    if len(single) > 1:
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join([*single, "$B:1"]),
            special_tokens=[(t, tokens.index(t)) for t in {bos, eos} if t in single],
        )
    extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    return Tokenizer(backend, bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
                     pad_token=token("padding_token_id"), chat_template=meta.get("tokenizer.chat_template"),
                     extra_eos_token_ids=extra_eos)


def _sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool):
    """A SentencePiece BPE model (GGUF "llama") as a `tokenizers` BPE, the way transformers converts one."""
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t for t, ty in zip(tokens, types) if ty == 1}
    # SentencePiece merges the pair whose merged piece scores highest: rank the merges by that score
    merges = sorted(
        (-scores[i], -k, k - len(piece), i, vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
        for i, (piece, ty) in enumerate(zip(tokens, types)) if ty == 1
        for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal
    )
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[m[-2:] for m in merges], unk_token=unk,
                                              fuse_unk=True, byte_fallback=True))
    replace = normalizers.Replace(" ", "\u2581")  # "▁" marks a space
    # add_space_prefix: SentencePiece's dummy prefix, a "▁" before the text (stripped again on decode)
    prefix = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*prefix, replace])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return backend
