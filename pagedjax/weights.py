"""load_params: HF checkpoints (safetensors, sharded, PyTorch .bin) and GGUF files -> Params.

Tensors are read one at a time (safetensors and GGUF memory-mapped, .bin through
torch.load(mmap=True, weights_only=True)), converted to our layout, put on the device (or
straight into their shards) and dropped, so the host never holds two copies of the weights.

What goes where is the model family's (pagedjax/models/family.py): its declarative weight map
(HF name -> our path(s) and how to convert), its base-model prefix, its GGUF tensor names.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from pagedjax import parallel
from pagedjax.bundled import bundled_model_path
from pagedjax.gguf_file import GGUFFile
from pagedjax.models import abstract_params, family
from pagedjax.models.config import ModelConfig
from pagedjax.models.registry import family_for_gguf
from pagedjax.params import Params
from pagedjax.quant_weights import QuantizedLinears, flat
from pagedjax.quantization.config import resolve_quantization

# Buffers some checkpoints carry that are not weights.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.(masked_)?bias|\.attention\.(masked_)?bias)$")


def _fill(v, i: int, e: int = 0):
    if isinstance(v, str):
        return v.replace("{}", str(i)).replace("{e}", str(e))
    return tuple(_fill(x, i, e) for x in v)


def _expand(table: dict[str, Any], num_layers: int, num_experts: int = 0) -> dict[str, Any]:
    """Writes out the {} layer and {e} expert templates of a map for every layer and expert."""
    return {_fill(k, i, e): _fill(v, i, e) for k, v in table.items()
            for i in (range(num_layers) if "{}" in k else [0])
            for e in (range(num_experts) if "{e}" in k else [0])}


def _leaf(target: str) -> tuple[str, int | None]:
    """Our path and expert slot of a weight-map target: "a.b[3]" -> ("a.b", 3), "a.b" -> ("a.b", None)."""
    if target.endswith("]"):
        path, slot = target[:-1].split("[")
        return path, int(slot)
    return target, None


# --- layout conversion ----------------------------------------------------------------------


def _merged(shape, axes) -> tuple[int, ...]:
    """Our shape with (heads, head_dim) dims merged, as HF stores them."""
    out, skip = [], False
    for i, (n, a) in enumerate(zip(shape, axes)):
        if skip:
            skip = False
            continue
        if a in ("heads", "kv_heads") and i + 1 < len(axes) and axes[i + 1] == "head_dim":
            out.append(n * shape[i + 1])
            skip = True
        else:
            out.append(n)
    return tuple(out)


def _source_shape(how: str, target_shape, axes, all_shapes=()) -> tuple[int, ...]:
    """The HF tensor shape that `how` turns into our target (the first target for fused q/k/v;
    all_shapes: every target's, for an uneven split)."""
    if how == "linear_split":  # torch Linear rows [out_0 | out_1 | ...]: each target's kernel [in, out_i...]
        return (sum(int(np.prod(t[1:])) for t in all_shapes), target_shape[0])
    m = _merged(target_shape, axes)
    if how in ("linear", "neox_qkv"):
        m = m[::-1]
    if how in ("experts_linear", "experts_gate_up"):  # [X, in, out] -> [X, out(, x2), in]
        m = (m[0], m[2] * (2 if how == "experts_gate_up" else 1), m[1])
    if how == "split3":
        m = m[:-1] + (3 * m[-1],)
    if how == "neox_qkv":
        m = (3 * m[0],) + m[1:]
    return m


def _convert(how: str, w: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """HF tensor -> our array(s) with the given target shapes."""
    if how == "copy":
        return [w.reshape(shapes[0])]
    if how == "linear":
        return [w.T.reshape(shapes[0])]
    if how == "split3":
        return [p.reshape(s) for p, s in zip(np.split(w, 3, axis=-1), shapes)]
    if how == "linear_split":  # Phi-3's fused qkv_proj / gate_up_proj: rows q | k | v or gate | up
        cuts = np.cumsum([int(np.prod(s[1:])) for s in shapes])[:-1]
        return [p.T.reshape(s) for p, s in zip(np.split(w, cuts, axis=0), shapes)]
    if how == "experts_linear":
        return [w.transpose(0, 2, 1).reshape(shapes[0])]
    if how == "experts_gate_up":  # [X, gate rows | up rows, D]
        return [p.transpose(0, 2, 1).reshape(s) for p, s in zip(np.split(w, 2, axis=1), shapes)]
    if how == "neox_qkv":  # rows are [N, (q|k|v), H]
        n = shapes[0][-2] if w.ndim == 1 else shapes[0][1]
        w = w.reshape(n, 3, -1, *w.shape[1:])  # [N, 3, H(, D)]
        return [w[:, i].reshape(n * w.shape[2], *w.shape[3:]).T.reshape(s) for i, s in enumerate(shapes)]
    raise ValueError(f"unknown conversion {how!r}")


def _gguf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved rotary pairs -> HF's half split)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


# --- checkpoint readers: name -> load() -> np.ndarray, one tensor at a time ----------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}

Source = dict[str, Callable[[], np.ndarray]]


def _safetensors(file: Path, copy: bool = True) -> Source:
    """Lazy readers of every tensor in one .safetensors file (memory-mapped, header parsed here);
    each returns an owned copy, or with copy=False a read-only view of the mapping."""
    with open(file, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        except (ValueError, MemoryError, OverflowError) as e:
            raise ValueError(f"{file} is not a safetensors file: {e}") from None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header.pop("__metadata__", None)

    def reader(info):
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: unsupported safetensors dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        buf = np.frombuffer(mm, dtype, (end - start) // dtype.itemsize, 8 + n + start)
        return lambda: np.array(buf.reshape(info["shape"])) if copy else buf.reshape(info["shape"])

    return {name: reader(info) for name, info in header.items()}


def _torch_bin(file: Path) -> Source:
    """Lazy readers of a PyTorch .bin state dict, unpickled with weights_only=True (tensors only)."""
    try:
        import torch
    except ImportError:
        raise ValueError(f"{file}: reading PyTorch .bin checkpoints needs torch (pip install torch), "
                         f"or convert the checkpoint to safetensors") from None

    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file} is not a plain tensor checkpoint (weights_only load failed): {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError(f"{file} does not hold a dict of tensors")

    def to_numpy(t):
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()

    return {name: (lambda t=t: to_numpy(t)) for name, t in sd.items()}


def _hf_files(folder: Path) -> list[Path]:
    """The weight files of a HF folder: sharded index, single safetensors or .bin."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).exists():
            files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            missing = [f for f in files if not (folder / f).exists()]
            if missing:
                raise ValueError(f"{folder / index} names shards that are missing: {missing}")
            return [folder / f for f in files]
        if (folder / single).exists():
            return [folder / single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise ValueError(f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or a "
                     f"sharded index (*.index.json)")


# --- the loader -----------------------------------------------------------------------------


def load_params(
    path: str | os.PathLike | None = None,
    *,
    dtype: Any = jnp.bfloat16,
    shardings: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    enable_expert_parallel: bool = False,
    progress: bool = True,
    quantization: str | None = None,
) -> Params:
    """Loads a HF checkpoint folder or a .gguf file (default: the bundled SmolLM2) as Params.

    Args:
      path: HF folder (config.json + safetensors / .bin, single or sharded) or a .gguf file.
      dtype: dtype of every weight on device.
      shardings: where to put each weight: None (default device), one Sharding for all, a pytree
        of Shardings shaped like the params, or fn(path: str, logical_axes: PartitionSpec,
        shape: ShapeDtypeStruct) -> Sharding | None, with paths like "layers_0.attn.q_proj.kernel".
      mesh: tensor parallel instead of `shardings`: each weight straight into its shards by
        pagedjax.parallel's rules; kv heads are repeated when fewer than the mesh's tp size, and
        the returned config says so (parallel.tp_config).
      enable_expert_parallel: with `mesh`, split an MoE model's experts whole over its tp devices
        (vLLM's --enable-expert-parallel) rather than each expert's MLP columns.
      progress: show a tqdm bar.
      quantization: vLLM's `quantization`: None loads what the checkpoint holds (a quantized one
        as its config.json's quantization_config says); "fp8" quantizes a float checkpoint's
        linears while loading (e4m3, per-output-channel scales, dynamic per-token activations);
        a method named for a quantized checkpoint must match its own ("fp8", "awq", "gptq",
        "compressed-tensors"). Embeddings, norms and the LM head stay in `dtype`.
    """
    if path is None:
        try:
            path = bundled_model_path()
        except FileNotFoundError as e:
            raise ValueError(f"no path given and {e}") from None
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such checkpoint: {path}")
    cache = None
    if path.is_file() and path.suffix == ".gguf":
        config, source, tokenizer = _open_gguf(path)
        cache = _cache_file(path, jnp.dtype(dtype))  # dequantizing GGUF blocks is the slow part: done once
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} has no config.json")
        config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()), name=path.name)
        source = {}
        for f in _hf_files(path):
            source.update(_safetensors(f) if f.suffix == ".safetensors" else _torch_bin(f))
        tok_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
        tokenizer = str(path) if any((path / t).exists() for t in tok_files) else None
    else:
        raise ValueError(f"{path} is neither a HF checkpoint folder nor a .gguf file")
    qcfg = resolve_quantization(config.quantization, quantization)
    if qcfg != config.quantization:
        config = config.replace(quantization=qcfg)
    kv_repeat = 1
    if enable_expert_parallel:
        if mesh is None:
            raise ValueError("load_params: enable_expert_parallel needs a mesh to split the experts over")
        config = config.replace(expert_parallel=True)  # ValueError for a model without experts
    if mesh is not None:
        if shardings is not None:
            raise ValueError("load_params: pass shardings or mesh, not both")
        shardings = parallel.param_shardings(config, mesh)
        kv_repeat = parallel.tp_config(config, parallel.tp_size(mesh)).num_kv_heads // config.num_kv_heads
    variables = _load_tree(config, source, jnp.dtype(dtype), shardings, progress, desc=path.name,
                           kv_repeat=kv_repeat, cache=cache)
    if kv_repeat > 1:
        config = config.replace(num_kv_heads=config.num_kv_heads * kv_repeat)
    return Params(variables, config, tokenizer)


def _open_gguf(path: Path) -> tuple[ModelConfig, Source, str]:
    gguf = GGUFFile(path)
    meta, tensors = gguf.metadata, gguf.tensors
    family_for_gguf(meta)  # a clear error for an architecture we do not read
    arch = meta["general.architecture"]
    if "token_embd.weight" in tensors and f"{arch}.vocab_size" not in meta:
        meta[f"{arch}.vocab_size"] = int(tensors["token_embd.weight"].shape[0])
    config = ModelConfig.from_gguf(meta, tensors.keys(), name=path.stem)
    fam = family(config.architecture)  # may differ from the GGUF's (a llama with experts is Mixtral)
    names = _expand(fam.gguf_tensor_map, config.num_layers, config.num_experts)

    def reader_for(name: str):
        heads = fam.gguf_permuted.get(name.split(".")[-2])
        n_heads = getattr(config, heads) if heads else 0

        def load():
            w = gguf.load(name)  # float32, HF [out, in] layout
            w = _gguf_unpermute(w, n_heads) if n_heads else w
            return np.array(fam.gguf_fix(name, w) if fam.gguf_fix is not None else w)
        return load

    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise ValueError(f"{path}: tensors we do not know how to load: {unknown[:8]}")
    return config, {names[n]: reader_for(n) for n in tensors}, str(path)


def resolve_sharding(shardings, name: str, keys: tuple[str, ...], axes, shape):
    """The Sharding (or None) that `shardings` (see load_params) gives the leaf at `keys`."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings):
        return shardings(name, axes, shape)
    tree = shardings.get("params", shardings) if isinstance(shardings, dict) else shardings
    for k in keys:
        tree = tree[k]
    return tree


def _load_tree(config: ModelConfig, source: Source, dtype, shardings, progress: bool, desc: str,
               kv_repeat: int = 1, cache: Path | None = None):
    """Converts each checkpoint tensor to our layout and places it; checks names and shapes.

    Per-expert tensors (targets "path[e]") are stacked on the host, one leaf at a time, and the
    whole [X, ...] leaf placed once all its experts are in. With `cache`, the converted leaves
    (in `dtype`, before any kv-head replication) are read from that file when it exists, and
    written to it otherwise.
    """
    # The checkpoint is planned against the float layout; quantized linears take over their kernels.
    shapes, axes = abstract_params(config.replace(quantization=None))
    flat_shapes = flat(shapes)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    flat_axes = {t: a for t, (_, a) in flat(axes, is_leaf=is_spec).items()}
    quant = QuantizedLinears(config, kv_repeat, desc) if config.quantization is not None else None
    out: dict[str, Any] = {}

    def put(t: str, arr: np.ndarray, keys: tuple[str, ...], shape, axes) -> None:
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        sharding = resolve_sharding(shardings, t, keys, axes, shape)
        node[keys[-1]] = jax.device_put(np.require(arr, requirements="C"), sharding)  # 0-d stays 0-d

    def place_quantized(t: str, arr: np.ndarray) -> None:  # a quantized linear's param, kv heads already repeated
        keys, shape = quant.shapes[t]
        put(t, arr, keys, shape, quant.axes[t])

    def place(t: str, arr: np.ndarray) -> None:  # our layout in `dtype` -> its place on the device(s)
        if quant is not None and quant.place_kernel(t, arr, place_quantized):
            return
        keys, shape = flat_shapes[t]
        arr = parallel.repeat_kv_heads(arr, flat_axes[t], kv_repeat)  # K < tp: replicas per device
        put(t, arr, keys, shape, flat_axes[t])

    if cache is not None and cache.exists():
        try:
            cached = _safetensors(cache, copy=False)  # views of the mapped file: device_put copies
            if set(cached) == set(flat_shapes):
                for t, load in cached.items():
                    place(t, load())
                return _checked(config, out, desc)
        except (ValueError, OSError):
            pass
        out.clear()  # unusable: convert again and rewrite it
    fam = family(config.architecture)
    table = _expand(fam.weight_map, config.num_layers, config.num_experts)
    prefix = fam.base_prefix
    # pre-quantized linears: their tensors leave the plan, their float kernels count as filled
    taken = quant.take(source, prefix) if quant is not None and not quant.online else {}
    experts = quant.take_experts(source, table, prefix) if taken else set()  # int4 MoE experts, kept int4
    if taken:  # pre-quantized linears the model keeps in its dtype (MoE routers ...): dequantized float weights
        quant.take_dequantized(source)
    kv_scales = quant.take_kv_scales(source, prefix) if quant is not None else {}  # FP8 KV-cache scales
    prefilled = quant.kernels() | experts if taken else set()

    def targets(hf):
        t = table[hf][0]
        return t if isinstance(t, tuple) else (t,)

    def fits(hf):  # every target is a leaf of this config (an expert slot: within its leaf)
        for t in targets(hf):
            path, slot = _leaf(t)
            if path not in flat_shapes or (slot is not None and slot >= flat_shapes[path][1].shape[0]):
                return False
        return True

    ignored = re.compile(fam.hf_ignored) if fam.hf_ignored else None

    def renamed(name: str) -> str:  # a multimodal checkpoint's names for its text model (Gemma 3)
        for old, new in fam.hf_renames.items():
            if name.startswith(old):
                return new + name[len(old):]
        return name

    # our leaves -> the HF name that fills them; checkpoints may lack the base-model prefix
    plan, unexpected = {}, []
    for name in source:
        if ignored is not None and ignored.search(name):
            continue  # not part of this model (a vision tower)
        hf = renamed(name)
        hf = hf if hf in table else prefix + hf if prefix + hf in table else None
        if hf is not None and fits(hf):
            plan[hf] = name
        elif _IGNORED.search(name) or (hf == "lm_head.weight" and config.tie_word_embeddings):
            continue  # buffers, or a tied head saved twice
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"{desc}: checkpoint tensors that this {config.architecture} config has no place for "
                         f"(unsupported option or wrong config?): {unexpected[:8]}"
                         + (quant.unexpected_message(unexpected) if quant is not None else ""))
    filled: dict[str, str] = {}  # target -> the checkpoint tensor filling it
    by_leaf: dict[str, str] = {}  # leaf -> a tensor filling it (whole or one expert)
    for hf, name in plan.items():
        for t in targets(hf):
            path, slot = _leaf(t)
            if t in filled or (path in by_leaf and (slot is None or path in filled)):
                raise ValueError(f"{desc}: tensors {by_leaf[path]} and {name} both fill {path}")
            filled[t] = by_leaf[path] = name
    # a leaf is complete when filled whole or every expert slot of it is
    need = [t for p, (_, s) in flat_shapes.items()
            for t in ([p] if p in filled or tuple(flat_axes[p])[:1] != ("experts",)
                      else [f"{p}[{e}]" for e in range(s.shape[0])])]
    unfilled = set(need) - filled.keys() - prefilled  # pre-quantized linears fill their kernels
    if unfilled:
        missing = [hf for hf in table if fits(hf) and hf not in plan and set(targets(hf)) & unfilled]
        raise ValueError(f"{desc}: checkpoint lacks tensors: {missing[:8] or sorted(unfilled)[:8]}")

    writer = _CacheWriter.open(cache, {t: s.shape for t, (_, s) in flat_shapes.items()}, dtype) if cache else None
    stacks: dict[str, tuple[np.ndarray, set[int]]] = {}  # leaf -> (host buffer, slots filled)

    def convert_and_place(path: str, arr: np.ndarray) -> None:
        arr = arr.astype(dtype, copy=False)  # cast on the host: no per-shape device compile
        if writer is not None:
            writer.write(path, arr)
        place(path, arr)

    try:
        # in our paths' order, so the experts of one leaf come together and one stack is open at a time
        for hf, name in tqdm(sorted(plan.items(), key=lambda item: targets(item[0])[0]), desc=f"loading {desc}",
                             unit="tensor", disable=not progress, leave=False):
            how, ts = table[hf][1], targets(hf)
            path, slot = _leaf(ts[0])
            cut = slot is not None  # one expert's slice of a stacked leaf
            want = _source_shape(how, flat_shapes[path][1].shape[cut:], tuple(flat_axes[path])[cut:],
                                 [flat_shapes[_leaf(t)[0]][1].shape[cut:] for t in ts])
            w = source[name]()
            if tuple(w.shape) != want:
                raise ValueError(f"{desc}: tensor {name} has shape {tuple(w.shape)}, this config needs {want}")
            for t, arr in zip(ts, _convert(how, w, [flat_shapes[_leaf(t)[0]][1].shape[cut:] for t in ts])):
                path, slot = _leaf(t)
                if slot is None:
                    convert_and_place(path, arr)
                    continue
                buf, done = stacks.setdefault(path, (np.empty(flat_shapes[path][1].shape, dtype), set()))
                buf[slot] = arr
                done.add(slot)
                if len(done) == buf.shape[0]:
                    convert_and_place(path, stacks.pop(path)[0])
            del w
        if taken:
            quant.load(taken, place_quantized)
            quant.load_experts(place_quantized)
        if kv_scales:
            quant.load_kv_scales(kv_scales, place_quantized)
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    if writer is not None:
        writer.close()
    return _checked(config, out, desc)


def _checked(config: ModelConfig, out: dict[str, Any], desc: str) -> dict[str, Any]:
    """{"params": out}, once every leaf of the model (quantized linears included) is there."""
    want = set(flat(abstract_params(config)[0]))
    got = set(flat(out))
    if got != want:
        raise ValueError(f"{desc}: loaded params differ from the model's: missing {sorted(want - got)[:8]}, "
                         f"unexpected {sorted(got - want)[:8]}")
    return {"params": out}


# --- the converted-weights cache --------------------------------------------------------------

_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def _cache_file(path: Path, dtype) -> Path | None:
    """Where the converted weights of checkpoint `path` in `dtype` are kept (None: caching off).

    $PAGEDJAX_WEIGHTS_CACHE, default ~/.cache/pagedjax/weights; empty turns it off. The name
    hashes the file's path, size and modification time, the dtype and pagedjax's own source.
    """
    from pagedjax.compile_cache import source_fingerprint

    root = os.environ.get("PAGEDJAX_WEIGHTS_CACHE")
    if root is None:
        root = os.path.join(os.path.expanduser("~"), ".cache", "pagedjax", "weights")
    if not root:
        return None
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{np.dtype(dtype).name}|"
                         f"{source_fingerprint()}".encode()).hexdigest()[:24]
    return Path(root) / f"{path.stem}-{np.dtype(dtype).name}-{key}.safetensors"


class _CacheWriter:
    """Streams tensors into a safetensors file whose header (every shape is known) comes first;
    renamed into place only when complete. Any failure just leaves no cache behind."""

    def __init__(self, final: Path, tmp: Path, f, offsets: dict[str, int]):
        self.final, self.tmp, self.f, self.offsets = final, tmp, f, offsets

    @classmethod
    def open(cls, final: Path, shapes: dict[str, tuple[int, ...]], dtype) -> _CacheWriter | None:
        dtype = np.dtype(dtype)
        if dtype not in _ST_NAMES:
            return None
        header, offsets, pos = {}, {}, 0
        for name, shape in shapes.items():
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            offsets[name], pos = pos, pos + n
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".partial-")
            f = os.fdopen(fd, "wb")
            f.write(len(blob).to_bytes(8, "little") + blob)
            f.truncate(8 + len(blob) + pos)
        except OSError:
            return None
        return cls(final, Path(tmp), f, {k: v + 8 + len(blob) for k, v in offsets.items()})

    def write(self, name: str, arr: np.ndarray) -> None:
        if self.f is None:
            return
        try:
            self.f.seek(self.offsets[name])
            self.f.write(np.ascontiguousarray(arr).tobytes())
        except OSError:
            self.abandon()

    def close(self) -> None:
        if self.f is None:
            return
        try:
            self.f.close()
            os.replace(self.tmp, self.final)
        except OSError:
            self.abandon()
        self.f = None

    def abandon(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        self.tmp.unlink(missing_ok=True)
