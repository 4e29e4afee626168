"""Independent float64 / numpy oracles for the quantization tests.

Written from the published descriptions, never with pagedjax code: the e4m3fn value grid from the
OCP FP8 spec (bias 7, 3 mantissa bits, subnormals, max 448, S.1111.111 is NaN), round to nearest
even; AutoAWQ's GEMM packer; AutoGPTQ's packer (v1 stores zero - 1); and their inverses, read
back nibble by nibble.
"""

from __future__ import annotations

import numpy as np

E4M3_MAX = 448.0


def e4m3_grid() -> tuple[np.ndarray, np.ndarray]:
    """(values, mantissa bits) of the 127 non-negative finite e4m3fn codes, ascending."""
    vals, mans = [], []
    for code in range(0x7F):  # 0x7F = S.1111.111 is NaN
        exp, man = code >> 3, code & 7
        vals.append(man / 8 * 2.0**-6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
        mans.append(man)
    return np.array(vals), np.array(mans)


def round_e4m3(v: np.ndarray) -> np.ndarray:
    """float64 values -> the nearest e4m3fn value (ties to even mantissa), saturated at +-448."""
    grid, mans = e4m3_grid()
    a = np.minimum(np.abs(np.asarray(v, np.float64)), E4M3_MAX)
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (mans[hi] % 2 == 0))
    return np.sign(v) * np.where(pick_hi, grid[hi], grid[lo])


def near_e4m3_tie(v: np.ndarray, rel: float = 1e-6) -> np.ndarray:
    """Where v lies within `rel` (relative) of a midpoint between two e4m3 values: a float32
    computation may round either way there."""
    grid, _ = e4m3_grid()
    mids = (grid[1:] + grid[:-1]) / 2
    a = np.abs(np.asarray(v, np.float64))
    i = np.clip(np.searchsorted(mids, a), 1, len(mids) - 1)
    d = np.minimum(np.abs(a - mids[i]), np.abs(a - mids[i - 1]))
    return d <= rel * np.maximum(a, 2.0**-9)


def check_e4m3_codes(got: np.ndarray, exact: np.ndarray, what: str) -> None:
    """got (float8) equals round_e4m3(exact) everywhere except at near-ties of `exact`."""
    want = round_e4m3(exact)
    g = np.asarray(got, np.float64)
    bad = (g != want) & ~near_e4m3_tie(exact)
    assert not bad.any(), (f"{what}: {bad.sum()} e4m3 codes differ from round-to-nearest-even, first at "
                           f"{np.argwhere(bad)[0]}: got {g[bad][0]}, want {want[bad][0]} (exact {exact[bad][0]})")


# --- int4 packers, as the published tools write checkpoints ---------------------------------


def awq_pack(v: np.ndarray) -> np.ndarray:
    """AutoAWQ WQLinear_GEMM.from_linear: v [rows, cols] -> int32 [rows, cols / 8]; packed column c
    gets `v[:, c * 8 + order_map[i]] << (i * 4)` for i in 0..7, order_map = [0, 2, 4, 6, 1, 3, 5, 7]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = v.shape
    out = np.zeros((rows, cols // 8), np.uint32)
    for col in range(cols // 8):
        for i in range(8):
            out[:, col] |= v[:, col * 8 + order_map[i]].astype(np.uint32) << (i * 4)
    return out.view(np.int32)


def gptq_pack_qweight(q_in_out: np.ndarray) -> np.ndarray:
    """AutoGPTQ QuantLinear.pack: intweight [in, out] -> qweight [in / 8, out]; row r gets
    `intweight[j] << (4 * (j - i))` for j in i..i+7, i = 8 r (packed along in)."""
    K, N = q_in_out.shape
    out = np.zeros((K // 8, N), np.uint32)
    row, i = 0, 0
    while row < out.shape[0]:
        for j in range(i, i + 8):
            out[row] |= q_in_out[j].astype(np.uint32) << (4 * (j - i))
        i += 8
        row += 1
    return out.view(np.int32)


def gptq_pack_qzeros(zeros: np.ndarray, v1: bool) -> np.ndarray:
    """AutoGPTQ: `zeros -= 1` (v1 only), then qzeros[:, col] gets `zeros[:, j] << (4 * (j - i))`
    for j in i..i+7, i = 8 col (packed along out)."""
    z = zeros.astype(np.int64) - (1 if v1 else 0)
    assert z.min() >= 0, "v1 cannot store a zero point of 0 (it would be -1)"
    G, N = z.shape
    out = np.zeros((G, N // 8), np.uint32)
    for col in range(N // 8):
        for j in range(8):
            out[:, col] |= z[:, col * 8 + j].astype(np.uint32) << (4 * j)
    return out.view(np.int32)


def awq_unpack(packed: np.ndarray) -> np.ndarray:
    """awq_pack's inverse: int32 [rows, cols / 8] -> [rows, cols]; nibble i of packed column c
    is column c * 8 + order_map[i]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    words = packed.view(np.uint32)
    rows, packed_cols = words.shape
    out = np.zeros((rows, packed_cols * 8), np.uint8)
    for col in range(packed_cols):
        for i in range(8):
            out[:, col * 8 + order_map[i]] = (words[:, col] >> (i * 4)) & 0xF
    return out


def gptq_unpack_qweight(qweight: np.ndarray) -> np.ndarray:
    """gptq_pack_qweight's inverse: int32 [in / 8, out] -> [in, out]; nibble j of row r is row 8 r + j."""
    words = qweight.view(np.uint32)
    out = np.zeros((words.shape[0] * 8, words.shape[1]), np.uint8)
    for r in range(words.shape[0]):
        for j in range(8):
            out[8 * r + j] = (words[r] >> (4 * j)) & 0xF
    return out


def gptq_unpack_qzeros(qzeros: np.ndarray, v1: bool) -> np.ndarray:
    """gptq_pack_qzeros's inverse: int32 [G, out / 8] -> zero points [G, out] (v1: stored + 1)."""
    words = qzeros.view(np.uint32)
    out = np.zeros((words.shape[0], words.shape[1] * 8), np.int64)
    for col in range(words.shape[1]):
        for j in range(8):
            out[:, col * 8 + j] = (words[:, col] >> (4 * j)) & 0xF
    return out + (1 if v1 else 0)
