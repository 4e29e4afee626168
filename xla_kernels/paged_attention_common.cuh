// PagedAttention CUDA kernels: what every kernel shares (element access, request metadata, the
// split-KV layout, the window, the score, the partials) and the merge of split-KV partials.
// Dims and the metadata contract: paged_attention.h. Included by paged_attention.cu only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "paged_attention.h"

namespace pagedjax {
namespace kernels {

using Params = PagedAttentionParams;
using Fp8 = __nv_fp8_e4m3;  // the FP8 KV cache's element (float8_e4m3fn)

constexpr int kThreads = 128;  // 4 warps in every kernel
constexpr float kLog2e = 1.4426950408889634f;

// ---- element access: q and out in T, the pool in T or Fp8 (read only, exact in f32) ----

template <typename T>
struct Io;
template <>
struct Io<float> {
  static __device__ __forceinline__ float Load(float x) { return x; }
  static __device__ __forceinline__ float Store(float x) { return x; }
};
template <>
struct Io<__half> {
  static __device__ __forceinline__ float Load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half Store(float x) { return __float2half_rn(x); }
};
template <>
struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float Load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 Store(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Io<Fp8> {
  static __device__ __forceinline__ float Load(Fp8 x) { return static_cast<float>(x); }
};

// ---- request metadata ----

struct Request {
  int q_begin, q_end;  // flat tokens, clamped into [0, T]
  int seq_len;         // clamped into [0, M * page_size]
  bool valid;          // metadata in range; otherwise the request's rows are NaN
};

__device__ __forceinline__ Request LoadRequest(const Params& p, int r) {
  const int q0 = __ldg(p.query_start_loc + r), q1 = __ldg(p.query_start_loc + r + 1);
  const int len = __ldg(p.seq_lens + r), max_len = p.max_pages * p.page_size;
  Request req;
  req.valid = 0 <= q0 && q0 <= q1 && q1 <= p.num_tokens && 0 <= len && len <= max_len && q1 - q0 <= len;
  req.q_begin = min(max(q0, 0), p.num_tokens);
  req.q_end = min(max(q1, req.q_begin), p.num_tokens);
  req.seq_len = min(max(len, 0), max_len);
  return req;
}

// First position a query at `pos` sees: 0, or with a sliding window W, pos - W + 1.
__device__ __forceinline__ int WindowLo(const Params& p, int pos) {
  return p.sliding_window > 0 ? max(0, pos - p.sliding_window + 1) : 0;
}

// The split-KV layout of a request, which the attention kernels and the merge both derive from
// the metadata. The positions some token of the request sees, [base, seq_len) (base: the window
// start of its first query token, 0 without a window, so a split never covers only positions no
// token sees), are cut into S splits of `chunk` positions, a multiple of kSplitGranule: split s
// covers [base + s * chunk, min(seq_len, base + (s + 1) * chunk)). The first `live` are non-empty;
// the kernels skip the others and the merge reads only the live ones. Every live split writes
// partials for every token row, -inf lse where a row sees none of it.
// With a fixed split size (p.split_size > 0) `chunk` is that size and `base` the multiple of it at
// or below the window start, so the splits sit at the same positions whatever the batch; `live`
// may then exceed S (the grid's splits) only for metadata out of range.
struct SplitLayout {
  int base, chunk, live;
};

__device__ __forceinline__ SplitLayout SplitLayoutOf(const Params& p, const Request& req) {
  SplitLayout s;
  s.base = min(WindowLo(p, req.seq_len - (req.q_end - req.q_begin)), req.seq_len);
  if (p.split_size > 0) {
    s.chunk = p.split_size;
    s.base = s.base / s.chunk * s.chunk;
    s.live = (req.seq_len - s.base + s.chunk - 1) / s.chunk;
    return s;
  }
  const int span = req.seq_len - s.base;
  const int per = (span + p.num_splits - 1) / p.num_splits;
  s.chunk = max((per + kSplitGranule - 1) / kSplitGranule, 1) * kSplitGranule;
  s.live = (span + s.chunk - 1) / s.chunk;
  return s;
}

// The fold of a fixed split size: a row's splits, in position order, into a running (max, weight,
// accumulator), each split given as its normalized output o and its lse (log2). The merge kernel
// and the tensor-core kernel's one-CTA walk both run exactly these operations (explicit rounding
// intrinsics, so no contraction can differ between them), so a token gets the same bits split
// across CTAs or not. A split the row does not see (lse = -inf) changes nothing: skipped.
struct FoldWeights {
  float a, b;  // acc <- acc * a + o * b
  bool skip;
};
__device__ __forceinline__ FoldWeights FoldStep(float& mx, float& w, float lse) {
  FoldWeights f{1.f, 0.f, lse == -INFINITY};
  if (f.skip) return f;
  const float nm = fmaxf(mx, lse);  // NaN lse (bad pages): the caller writes NaN
  f.a = exp2f(__fsub_rn(mx, nm));   // mx = -inf (the first split seen): 0
  f.b = exp2f(__fsub_rn(lse, nm));
  w = __fmaf_rn(w, f.a, f.b);
  mx = nm;
  return f;
}
__device__ __forceinline__ float FoldAcc(float acc, const FoldWeights& f, float o) {
  return f.skip ? acc : __fmaf_rn(o, f.b, __fmul_rn(acc, f.a));
}
__device__ __forceinline__ float FoldOut(float acc, float w) {
  return w > 0.f ? __fmul_rn(acc, __frcp_rn(w)) : 0.f;
}

// The score of q.k in the log2 domain, as x = (q.k) * mul: scale * k_scale folded into mul (the
// FP8 pool's K scale is a factor of every dot product), then the soft-cap c * tanh(s / c) when
// there is one (mul carries 1 / c and the result c * log2(e)), else mul carries log2(e).
struct Scorer {
  float mul;       // multiplies the raw dot product (SIMT: folded into q)
  float cap_log2;  // c * log2(e); 0: no cap

  __device__ __forceinline__ float operator()(float x) const { return cap_log2 > 0.f ? cap_log2 * tanhf(x) : x; }
};

__device__ __forceinline__ Scorer MakeScorer(const Params& p, int kh) {
  const float qk = p.scale * __ldg(p.k_scale + kh);
  Scorer s;
  if (p.logit_softcap > 0.f) {
    s.mul = qk / p.logit_softcap;
    s.cap_log2 = p.logit_softcap * kLog2e;
  } else {
    s.mul = qk * kLog2e;
    s.cap_log2 = 0.f;
  }
  return s;
}

// Largest i in [0, n) with key(i) <= x, or -1; keys are non-decreasing for valid metadata (for
// any keys it terminates and stays in range). The whole warp calls it and gets the same answer.
template <typename Key>
__device__ __forceinline__ int WarpFindLastLE(const Key& key, int n, int x) {
  const int lane = threadIdx.x & 31;
  int lo = 0, hi = n;  // answer in [lo - 1, hi - 1]
  while (hi > lo) {
    const int stride = (hi - lo + 31) / 32;
    const int idx = lo + lane * stride;
    const unsigned ball = __ballot_sync(0xffffffffu, idx < hi && key(idx) <= x);
    if (ball == 0) {
      hi = lo;
      break;
    }
    const int last = 31 - __clz(ball);
    const int at = lo + last * stride;
    lo = at + 1;
    hi = min(hi, at + stride);
  }
  return lo - 1;
}

struct StartKey {  // query_start_loc[i]
  const int32_t* qsl;
  __device__ __forceinline__ int operator()(int i) const { return __ldg(qsl + i); }
};
struct SlotKey {  // first tile slot of request i: query_start_loc[i] / tile_q + i
  const int32_t* qsl;
  int tile_q;
  __device__ __forceinline__ int operator()(int i) const { return __ldg(qsl + i) / tile_q + i; }
};

// Element offset of position `pos` of request r, kv head kh, or -1 for a page id out of range.
// pos < seq_len <= M * page_size keeps the block-table read in bounds.
__device__ __forceinline__ int64_t KvOffset(const Params& p, int r, int pos, int kh) {
  const int page = __ldg(p.block_tables + static_cast<int64_t>(r) * p.bt_stride + pos / p.page_size);
  if (page < 0 || page >= p.num_pages) return -1;
  return static_cast<int64_t>(page) * p.kv_stride_page +
         static_cast<int64_t>(pos % p.page_size) * p.kv_stride_token + static_cast<int64_t>(kh) * p.kv_stride_head;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Split-KV partials: o [S, T, N, H] (normalized per split, V scale applied), then lse [S, T, N]
// (log2 domain).
__device__ __forceinline__ float* PartialO(const Params& p, int s, int t, int n) {
  return p.workspace + ((static_cast<int64_t>(s) * p.num_tokens + t) * p.num_heads + n) * p.head_dim;
}
__device__ __forceinline__ float* PartialLse(const Params& p, int s, int t, int n) {
  return p.workspace + static_cast<int64_t>(p.num_splits) * p.num_tokens * p.num_heads * p.head_dim +
         (static_cast<int64_t>(s) * p.num_tokens + t) * p.num_heads + n;
}

template <typename T>
__device__ __forceinline__ T* OutRow(const Params& p, int t, int n) {
  return static_cast<T*>(p.out) + static_cast<int64_t>(t) * p.out_stride_token +
         static_cast<int64_t>(n) * p.out_stride_head;
}

// ---- merge of split-KV partials: one warp per (token, head) ----

template <typename T>
__global__ void __launch_bounds__(kThreads) MergeSplitsKernel(const Params p) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x, n = blockIdx.y * (kThreads / 32) + threadIdx.x / 32;
  if (n >= p.num_heads) return;  // whole warps; no block-wide sync below
  const int H = p.head_dim;
  T* out = OutRow<T>(p, t, n);
  const int r = WarpFindLastLE(StartKey{p.query_start_loc}, p.num_requests + 1, t);
  if (r < 0 || r >= p.num_requests) {  // padding token
    for (int d = lane; d < H; d += 32) out[d] = Io<T>::Store(0.f);
    return;
  }
  const Request req = LoadRequest(p, r);
  if (!req.valid || t < req.q_begin || t >= req.q_end) {
    for (int d = lane; d < H; d += 32) out[d] = Io<T>::Store(__int_as_float(0x7fc00000));
    return;
  }
  const int live = SplitLayoutOf(p, req).live;  // >= 1: every token sees itself
  if (p.split_size > 0) {  // fixed split size: the fold, in split order (lanes over d)
    if (live > p.num_splits) {  // more splits than the grid ran: metadata out of range
      for (int d = lane; d < H; d += 32) out[d] = Io<T>::Store(__int_as_float(0x7fc00000));
      return;
    }
    constexpr int kMaxPerLane = 256 / 32;
    float mx = -INFINITY, w = 0.f, acc[kMaxPerLane];
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) acc[i] = 0.f;
    bool nan = false;
    for (int s = 0; s < live; ++s) {
      const float lse = *PartialLse(p, s, t, n);
      nan |= isnan(lse);
      const FoldWeights f = FoldStep(mx, w, lse);
      const float* o = PartialO(p, s, t, n);
#pragma unroll
      for (int i = 0; i < kMaxPerLane; ++i)
        if (lane + 32 * i < H) acc[i] = FoldAcc(acc[i], f, o[lane + 32 * i]);
    }
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i)
      if (lane + 32 * i < H) out[lane + 32 * i] = Io<T>::Store(nan ? __int_as_float(0x7fc00000) : FoldOut(acc[i], w));
    return;
  }
  float mx = -INFINITY;
  bool nan = false;
  for (int s = 0; s < live; ++s) {
    const float v = *PartialLse(p, s, t, n);
    nan |= isnan(v);
    mx = fmaxf(mx, v);
  }
  float wsum = 0.f;
  for (int s = 0; s < live; ++s) wsum += mx == -INFINITY ? 0.f : exp2f(*PartialLse(p, s, t, n) - mx);
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  for (int d = lane; d < H; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < live; ++s) {
      const float w = mx == -INFINITY ? 0.f : exp2f(*PartialLse(p, s, t, n) - mx);
      acc += w * PartialO(p, s, t, n)[d];
    }
    out[d] = Io<T>::Store(nan ? __int_as_float(0x7fc00000) : acc * inv);
  }
}

}  // namespace kernels
}  // namespace pagedjax
