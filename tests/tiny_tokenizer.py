"""A tiny byte-level BPE tokenizer folder for tests' random models (deterministic, ChatML template)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers


_TEST_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The capital of France is Paris.",
    "Hello world! def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Once upon a time there was a little model that could generate text, one token at a time.",
    "0123456789 3.14159 2.71828 42 1000 2024-11-25",
    "Ünïcödé: naïve café, 日本語のテキスト, 中文文本, 한국어, emoji 😀🚀✨, Ελληνικά, русский.",
]
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_test_tokenizer(path: str | os.PathLike, vocab_size: int = 512) -> str:
    """Write a byte-level BPE tokenizer folder with exactly `vocab_size` ids, for tiny random models.

    Ids 0-2 are <|endoftext|>, <|im_start|> (bos), <|im_end|> (eos, pad); then the 256 byte
    symbols (so any text round-trips), merges learned from a small inline corpus, and
    <|reserved_k|> special tokens if the corpus runs out of merges. Has a ChatML chat template.
    Deterministic. Returns `path`.
    """
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= 259 (256 bytes + 3 special tokens), got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TEST_CORPUS * 4, trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<|reserved_{k}|>" for k in range(vocab_size - n)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
              "unk_token": None, "chat_template": _CHATML_TEMPLATE, "model_max_length": 1 << 20,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return str(out)
