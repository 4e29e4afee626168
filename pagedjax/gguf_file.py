"""GGUF files, read once: metadata, tensor infos and (dequantized) tensor data; host only, no jax.

One pass over the header with numpy for numeric arrays: `gguf.GGUFReader` builds a numpy view per
array item, 2.8 s on SmolLM2's 49k-token vocabulary against 0.14 s here, and both the tokenizer
and the weights read the file at every start-up. The `gguf` package still does what it is made
for: the quantization formats (`gguf.quants.dequantize`) and their block sizes.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types: scalar struct codes (type 8 = string, 9 = array).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's header entry; `shape` in numpy order (llama.cpp's ne reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int  # gguf.GGMLQuantizationType value
    offset: int  # byte offset of its data in the file


class GGUFFile:
    """The metadata (key -> value) and tensor infos of a GGUF file; `load(name)` reads a tensor."""

    def __init__(self, path: str | os.PathLike, *, prefix: str = "", tensors: bool = True):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata, self.tensors = _parse(self._mm, self.path, prefix, tensors)

    def load(self, name: str) -> np.ndarray:
        """The tensor `name` as float32 (quantized types dequantized), or its own dtype if plain."""
        t = self.tensors[name]
        if t.ggml_type in _PLAIN:
            dt = np.dtype(_PLAIN[t.ggml_type])
            n = int(np.prod(t.shape))
            return np.frombuffer(self._mm, dt, n, t.offset).reshape(t.shape).copy()
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize, quant_shape_to_byte_shape

        qtype = GGMLQuantizationType(t.ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(t.shape)) * type_size // block
        raw = np.frombuffer(self._mm, np.uint8, n_bytes, t.offset).reshape(quant_shape_to_byte_shape(t.shape, qtype))
        return np.asarray(dequantize(raw, qtype), np.float32)


def read_gguf_metadata(path: str | os.PathLike, prefix: str = "") -> dict[str, Any]:
    """The key/value metadata of a GGUF file (keys starting with `prefix`), without its tensors."""
    return GGUFFile(path, prefix=prefix, tensors=False).metadata


def _read_strings(buf, pos: int, n: int, e: str) -> tuple[list[str], int]:
    """n GGUF strings (u64 length, utf-8 bytes) from byte pos; returns them and the next pos."""
    length = struct.Struct(e + "Q").unpack_from
    out = []
    for _ in range(n):
        (m,) = length(buf, pos)
        pos += 8 + m
        out.append(buf[pos - m : pos].decode("utf-8", errors="replace"))
    return out, pos


def _parse(buf, path: Path, prefix: str, with_tensors: bool):
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    e = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"  # big-endian files exist
    version, n_tensors, n_kv = struct.unpack_from(e + "IQQ", buf, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is too old")
    pos = 24

    def read(fmt: str):
        nonlocal pos
        vals = struct.unpack_from(e + fmt, buf, pos)
        pos += struct.calcsize(e + fmt)
        return vals[0]

    def read_str() -> str:
        nonlocal pos
        n = read("Q")
        pos += n
        return buf[pos - n : pos].decode("utf-8", errors="replace")

    def read_value(ty: int):
        nonlocal pos
        if ty == 8:
            return read_str()
        if ty != 9:
            if ty not in _SCALAR:
                raise ValueError(f"{path}: unknown GGUF value type {ty} at byte {pos}")
            return read(_SCALAR[ty])
        item_ty, n = read("I"), read("Q")
        if item_ty == 8:  # a vocabulary or merges: hundreds of thousands of strings
            strings, pos = _read_strings(buf, pos, n, e)
            return strings
        if item_ty in _SCALAR:
            dt = np.dtype(e + _SCALAR[item_ty]) if item_ty != 7 else np.dtype(bool)
            arr = np.frombuffer(buf, dt, n, pos).tolist()
            pos += n * dt.itemsize
            return arr
        return [read_value(item_ty) for _ in range(n)]

    meta, alignment = {}, 32
    for _ in range(n_kv):
        key = read_str()
        value = read_value(read("I"))
        if key == "general.alignment":
            alignment = int(value)
        if key.startswith(prefix):
            meta[key] = value
    tensors: dict[str, GGUFTensor] = {}
    if not with_tensors:
        return meta, tensors
    infos = []
    for _ in range(n_tensors):
        name = read_str()
        ne = [read("Q") for _ in range(read("I"))]
        infos.append((name, tuple(reversed(ne)), read("I"), read("Q")))
    start = -(-pos // alignment) * alignment  # the data section is aligned
    for name, shape, ggml_type, offset in infos:
        if name in tensors:
            raise ValueError(f"{path}: tensor {name} appears twice")
        tensors[name] = GGUFTensor(name, shape, ggml_type, start + offset)
    return meta, tensors
