// PagedAttention over a ragged batch: CUDA kernels and the CUDA handler (FFI target
// "pagedjax_paged_attention", platform CUDA). Dims and the metadata contract: paged_attention.h.
//
// Kernels (every launch shape depends only on static shapes and attributes: CUDA-graph safe):
//  - TensorCoreKernel<T, H, WM> (bf16/f16): one CTA of 4 warps per (query tile, kv head, split).
//    A query tile is up to 16*WM rows of (token, query head) of one request: the GQA group's heads
//    of a few consecutive tokens, so K/V is read once per group. K/V positions stream through a
//    two-stage cp.async pipeline in tiles of 64 (16-byte loads; the page table is read a tile
//    ahead, one row per thread, into shared memory),
//    S = QK^T and O += PV run on mma.sync m16n8k16 with fp32 accumulators, online softmax in
//    registers. WM=1 (decode): the 4 warps share 16 rows and split each K/V tile, merging at the
//    end. WM=4 (prefill): each warp owns 16 rows of a 64-row tile, sharing every K/V tile.
//  - SimtKernel<T, H> (any dtype incl. f32; also the fallback): one CTA per (token, kv head,
//    split), up to 8 query heads of the group, K/V tiles staged in shared memory as f32.
//  - MergeSplitsKernel<T>: split-KV (flash-decoding) partials (o, lse) -> out.
// Query tiles map to CTAs without reading lengths on the host: a grid of T / BQ + R + 1 slots,
// slot w serving request r = max{r : query_start_loc[r] / BQ + r <= w} (searched by a warp), tile
// w - key(r) of it; slots past the last request zero the padding tokens.
// Metadata out of range (a page id outside [0, P), seq_len beyond the block table, q_len >
// seq_len, a bad query_start_loc) never reads out of bounds: that request's rows become NaN.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "paged_attention.h"
#include "xla/ffi/api/ffi.h"

namespace pagedjax {
namespace {

namespace ffi = xla::ffi;
using Params = PagedAttentionParams;

constexpr int kThreads = 128;  // 4 warps in every kernel
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// Shared device helpers
// ---------------------------------------------------------------------------------------------

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

// Positions per split of a request: seq_len / S rounded up to kSplitGranule. Split s covers
// [s * chunk, min(seq_len, (s + 1) * chunk)); the merge reads only the non-empty ones.
__device__ __forceinline__ int SplitChunk(int seq_len, int num_splits) {
  const int per = (seq_len + num_splits - 1) / num_splits;
  return (per + kSplitGranule - 1) / kSplitGranule * kSplitGranule;
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

// Split-KV partials: o [S, T, N, H] (normalized per split), then lse [S, T, N] (log2 domain).
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

// ---------------------------------------------------------------------------------------------
// Merge of split-KV partials: one warp per (token, head).
// ---------------------------------------------------------------------------------------------

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
  const int chunk = SplitChunk(req.seq_len, p.num_splits);
  const int live = (req.seq_len + chunk - 1) / chunk;  // non-empty splits (seq_len >= q_len >= 1)
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

// ---------------------------------------------------------------------------------------------
// SIMT kernel: one CTA per (token, kv head, head chunk of <= 8, split). Any dtype.
// ---------------------------------------------------------------------------------------------

template <typename T, int H>
__global__ void __launch_bounds__(kThreads) SimtKernel(const Params p, int head_chunks) {
  constexpr int kTk = H <= 128 ? 32 : 16;  // positions per tile
  constexpr int kMaxG = 8;                 // query heads per CTA
  constexpr int kStride = H + 1;           // f32 row stride: column reads hit distinct banks
  constexpr int kAcc = (kMaxG * H + kThreads - 1) / kThreads;
  __shared__ float qs[kMaxG][H];
  __shared__ float ks[kTk][kStride];
  __shared__ float vs[kTk][kStride];
  __shared__ float ss[kMaxG][kTk];
  __shared__ float alpha_s[kMaxG], m_s[kMaxG], l_s[kMaxG];
  __shared__ int64_t row_off[kTk];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t = blockIdx.x, kh = blockIdx.y / head_chunks, hc = blockIdx.y % head_chunks, split = blockIdx.z;
  const int G = p.num_heads / p.num_kv_heads;
  const int g0 = hc * kMaxG, gn = min(kMaxG, G - g0), n0 = kh * G + g0;
  const bool direct = p.num_splits == 1;  // else the merge kernel writes out

  const int r = WarpFindLastLE(StartKey{p.query_start_loc}, p.num_requests + 1, t);
  if (r < 0 || r >= p.num_requests) {  // padding token
    if (direct)
      for (int i = tid; i < gn * H; i += kThreads) OutRow<T>(p, t, n0 + i / H)[i % H] = Io<T>::Store(0.f);
    return;
  }
  const Request req = LoadRequest(p, r);
  if (!req.valid || t < req.q_begin || t >= req.q_end) {
    if (direct)
      for (int i = tid; i < gn * H; i += kThreads)
        OutRow<T>(p, t, n0 + i / H)[i % H] = Io<T>::Store(__int_as_float(0x7fc00000));
    return;
  }
  const int L = req.seq_len;
  const int chunk = SplitChunk(L, p.num_splits), lo = split * chunk;
  if (lo >= L) return;  // empty split: the merge skips it
  const int pos_end = L - (req.q_end - req.q_begin) + (t - req.q_begin) + 1;  // causal
  const int hi = min(min(L, lo + chunk), pos_end);

  const float scale_log2 = p.scale * kLog2e;
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < kMaxG * H; i += kThreads) {
    const int g = i / H, d = i % H;
    qs[g][d] = g < gn ? Io<T>::Load(q[t * p.q_stride_token + (n0 + g) * p.q_stride_head + d]) * scale_log2 : 0.f;
  }
  if (tid < kMaxG) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
  bool bad = false;
  const T* kp = static_cast<const T*>(p.k_pages);
  const T* vp = static_cast<const T*>(p.v_pages);

  for (int tile0 = lo; tile0 < hi; tile0 += kTk) {
    if (tid < kTk) {
      const int pos = tile0 + tid;
      int64_t off = -2;  // -2: past the range (zeros), -1: bad page id
      if (pos < hi) off = KvOffset(p, r, pos, kh);
      bad |= off == -1;
      row_off[tid] = off;
    }
    __syncthreads();
    for (int i = tid; i < kTk * H; i += kThreads) {
      const int j = i / H, d = i % H;
      const int64_t off = row_off[j];
      ks[j][d] = off >= 0 ? Io<T>::Load(kp[off + d]) : 0.f;
      vs[j][d] = off >= 0 ? Io<T>::Load(vp[off + d]) : 0.f;  // never multiply garbage by a zero weight
    }
    __syncthreads();
    for (int i = tid; i < kMaxG * kTk; i += kThreads) {
      const int g = i / kTk, j = i % kTk;
      float s = -INFINITY;
      if (g < gn && tile0 + j < hi) {
        s = 0.f;
#pragma unroll 8
        for (int d = 0; d < H; ++d) s += qs[g][d] * ks[j][d];
      }
      ss[g][j] = s;
    }
    __syncthreads();
    for (int g = warp; g < gn; g += kThreads / 32) {
      const float s = lane < kTk ? ss[g][lane] : -INFINITY;
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, WarpMax(s));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float pj = exp2f(s - m_use);
      const float sum = WarpSum(pj);
      if (lane < kTk) ss[g][lane] = pj;
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);
        alpha_s[g] = alpha;
        l_s[g] = l_s[g] * alpha + sum;
        m_s[g] = m_new;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      const int idx = tid + i * kThreads, g = idx / H, d = idx % H;
      if (g < gn) {
        float a = acc[i] * alpha_s[g];
#pragma unroll 8
        for (int j = 0; j < kTk; ++j) a += ss[g][j] * vs[j][d];
        acc[i] = a;
      }
    }
    __syncthreads();  // ks/vs/ss are rewritten by the next tile
  }
  bad = __syncthreads_or(bad);
  const float nan = __int_as_float(0x7fc00000);
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int idx = tid + i * kThreads, g = idx / H, d = idx % H;
    if (g >= gn) continue;
    const float l = l_s[g];
    const float o = bad ? nan : (l > 0.f ? acc[i] / l : 0.f);
    if (direct) {
      OutRow<T>(p, t, n0 + g)[d] = Io<T>::Store(o);
    } else {
      PartialO(p, split, t, n0 + g)[d] = o;
      if (d == 0) *PartialLse(p, split, t, n0 + g) = bad ? nan : (l > 0.f ? m_s[g] + log2f(l) : -INFINITY);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 / f16)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(SmemAddr(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(smem))
               : "memory");
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(smem))
               : "memory");
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  // d += a (16x16, row) * b (16x8, col), fp32 accumulators.
  static __device__ __forceinline__ void Run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void Run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// One launch of the tensor-core kernel: how rows map to (token, head) and which requests it serves.
struct TileArgs {
  int tile_q;          // BQ: tokens per query tile
  int heads_per_tile;  // HC: query heads of the group per tile (rows = BQ * HC <= 16 * WM)
  int head_chunks;     // ceil(G / HC)
  int min_q_len, max_q_len;  // requests with q_len in [min, max] (the other launch takes the rest)
  bool zero_padding;   // this launch zeroes padding tokens (when num_splits == 1)
};

template <int H>
struct TcShape {
  static constexpr int kTile = 64;         // K/V positions per pipeline stage
  static constexpr int kRowElems = H + 8;  // smem row (16-byte pad: conflict-free ldmatrix)
  static constexpr int kStageElems = 2 * kTile * kRowElems;  // K tile then V tile
  static constexpr int kSmemBytes = 2 * kStageElems * 2;    // two stages of 16-bit elements
};

template <typename T, int H, int WM>
__global__ void __launch_bounds__(kThreads) TensorCoreKernel(const Params p, const TileArgs a) {
  static_assert(H % 16 == 0 && H <= 256, "head dim must be a multiple of 16, at most 256");
  using S = TcShape<H>;
  constexpr int kRows = 16 * WM;          // query rows per CTA
  constexpr int kWn = 4 / WM;             // warps sharing a row block (splitting each K/V tile)
  constexpr int kWarpPos = S::kTile / kWn;  // positions per warp per tile
  constexpr int kChunks = H / 8;          // 16-byte chunks per K/V row
  constexpr int kKSteps = H / 16;
  constexpr int kOTiles = H / 8;
  constexpr int kOStride = H + 8;         // f32 row stride of the final merge buffer
  static_assert(4 * 16 * kOStride * 4 + 2 * 4 * 16 * 4 <= S::kSmemBytes, "merge buffer fits");

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int row_t[kRows], row_n[kRows], row_end[kRows];
  __shared__ float row_w[kRows][kWn], row_lse[kRows];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WM, wn = warp / WM;
  const int kh = blockIdx.y / a.head_chunks, hc = blockIdx.y % a.head_chunks, split = blockIdx.z;
  const int G = p.num_heads / p.num_kv_heads;
  const int R = p.num_requests, T_ = p.num_tokens;
  const bool direct = p.num_splits == 1;
  const float nan = __int_as_float(0x7fc00000);

  // ---- which request and tokens this CTA serves ----
  const SlotKey key{p.query_start_loc, a.tile_q};
  const int w = blockIdx.x;
  const int r = WarpFindLastLE(key, R + 1, w);
  if (r < 0) return;
  int tile_t0, tile_len, mode;  // mode 0: attend, 1: zeros (padding), 2: NaN (bad metadata)
  Request req{};
  if (r == R) {
    if (!a.zero_padding || !direct) return;
    tile_t0 = min(max(__ldg(p.query_start_loc + R), 0), T_) + (w - key(R)) * a.tile_q;
    if (tile_t0 >= T_) return;
    tile_len = min(a.tile_q, T_ - tile_t0);
    mode = 1;
  } else {
    req = LoadRequest(p, r);
    const int q_len = req.q_end - req.q_begin;
    if (q_len < a.min_q_len || q_len > a.max_q_len) return;  // the other launch serves it
    tile_t0 = req.q_begin + (w - key(r)) * a.tile_q;
    if (tile_t0 < req.q_begin || tile_t0 >= req.q_end) return;  // idle slot
    tile_len = min(a.tile_q, req.q_end - tile_t0);
    mode = req.valid ? 0 : 2;
    if (mode == 2 && !direct) return;  // the merge writes the NaNs
  }
  const int L = req.seq_len;
  const int chunk = mode == 0 ? SplitChunk(L, p.num_splits) : 0;
  const int lo = split * chunk;
  if (mode == 0 && lo >= L) return;  // empty split: the merge skips it
  if (mode != 0 && split > 0) return;
  const int hi = mode == 0 ? min(L, lo + chunk) : 0;
  const int first_pos = L - (req.q_end - req.q_begin);  // position of the request's first query token

  if (tid < kRows) {
    const int tok = tid / a.heads_per_tile, g = hc * a.heads_per_tile + tid % a.heads_per_tile;
    const bool ok = tok < tile_len && g < G;
    const int t = tile_t0 + tok;
    row_t[tid] = ok ? t : -1;
    row_n[tid] = kh * G + g;
    row_end[tid] = ok && mode == 0 ? min(hi, first_pos + (t - req.q_begin) + 1) : lo;
  }
  __syncthreads();

  if (mode != 0) {  // padding zeros or NaN rows, written directly (num_splits == 1 here)
    const float v = mode == 1 ? 0.f : nan;
    for (int i = tid; i < kRows * H; i += kThreads) {
      const int row = i / H;
      if (row_t[row] >= 0) OutRow<T>(p, row_t[row], row_n[row])[i % H] = Io<T>::Store(v);
    }
    return;
  }
  // Last position any row of this tile attends to (+1): the last token's.
  const int cta_end = min(hi, first_pos + (tile_t0 + tile_len - 1 - req.q_begin) + 1);

  // ---- Q fragments (A operand, rows r0 = lane/4 and r1 = r0 + 8 of this warp's 16) ----
  const int r0 = wm * 16 + lane / 4, r1 = r0 + 8;
  const T* q = static_cast<const T*>(p.q);
  uint32_t qf[kKSteps][4];
  {
    const int t0 = row_t[r0], t1 = row_t[r1];
    const T* q0 = q + static_cast<int64_t>(max(t0, 0)) * p.q_stride_token + static_cast<int64_t>(row_n[r0]) * p.q_stride_head;
    const T* q1 = q + static_cast<int64_t>(max(t1, 0)) * p.q_stride_token + static_cast<int64_t>(row_n[r1]) * p.q_stride_head;
    const int c = (lane % 4) * 2;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      qf[ks][0] = t0 >= 0 ? *reinterpret_cast<const uint32_t*>(q0 + ks * 16 + c) : 0u;
      qf[ks][1] = t1 >= 0 ? *reinterpret_cast<const uint32_t*>(q1 + ks * 16 + c) : 0u;
      qf[ks][2] = t0 >= 0 ? *reinterpret_cast<const uint32_t*>(q0 + ks * 16 + c + 8) : 0u;
      qf[ks][3] = t1 >= 0 ? *reinterpret_cast<const uint32_t*>(q1 + ks * 16 + c + 8) : 0u;
    }
  }
  const int end0 = row_end[r0], end1 = row_end[r1];
  const float scale_log2 = p.scale * kLog2e;

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows r0, r1 (l: this thread's part)
  float o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  T* kv_smem = reinterpret_cast<T*>(smem);
  const T* kp = static_cast<const T*>(p.k_pages);
  const T* vp = static_cast<const T*>(p.v_pages);
  bool bad = false;

  // Element offset of row `tid` of the tile at `start` (threads < kTile): -2 past cta_end (zeros),
  // -1 for a bad page id. Looked up a tile ahead into row_off, so the block-table read is in flight
  // during a tile's compute; read beside each cp.async instead, every cp.async waits on its read
  // (they alternate in the PTX): 8 dependent round trips per thread per tile.
  __shared__ int64_t row_off[2][S::kTile];  // [stage][row]
  auto row_offset = [&](int start) -> int64_t {
    const int pos = start + tid;
    return tid < S::kTile && pos < cta_end ? KvOffset(p, r, pos, kh) : -2;
  };
  // Stage `stage` <- the tile whose offsets are in row_off[stage]; rows with off < 0 are zeros.
  auto load_tile = [&](int stage) {
    T* ks = kv_smem + stage * S::kStageElems;
    T* vs = ks + S::kTile * S::kRowElems;
#pragma unroll
    for (int i = 0; i < S::kTile * kChunks / kThreads; ++i) {
      const int c = tid + i * kThreads, row = c / kChunks, col = (c % kChunks) * 8;
      T* kd = ks + row * S::kRowElems + col;
      T* vd = vs + row * S::kRowElems + col;
      const int64_t off = row_off[stage][row];
      if (off >= 0) {
        CpAsync16(kd, kp + off + col);
        CpAsync16(vd, vp + off + col);
      } else {
        bad |= off == -1;
        *reinterpret_cast<uint4*>(kd) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(vd) = make_uint4(0, 0, 0, 0);
      }
    }
  };

  const int num_tiles = cta_end > lo ? (cta_end - lo + S::kTile - 1) / S::kTile : 0;
  if (tid < S::kTile) {
    const int64_t off0 = row_offset(lo), off1 = row_offset(lo + S::kTile);  // both reads in flight
    row_off[0][tid] = off0;
    row_off[1][tid] = off1;
  }
  __syncthreads();
  if (num_tiles > 0) load_tile(0);
  CpAsyncCommit();
  for (int it = 0; it < num_tiles; ++it) {
    if (it + 1 < num_tiles) load_tile((it + 1) & 1);
    CpAsyncCommit();
    // Tile it + 2's offsets, stored into row_off[it & 1] after this tile's compute: its last
    // reader, load_tile at iteration it - 1, is behind the barrier below.
    const int64_t next_off = row_offset(lo + (it + 2) * S::kTile);
    CpAsyncWait<1>();  // tile `it` has landed (only the newest group may be in flight)
    __syncthreads();
    const T* ks = kv_smem + (it & 1) * S::kStageElems;
    const T* vs = ks + S::kTile * S::kRowElems;
    const int tile_start = lo + it * S::kTile;
#pragma unroll
    for (int sub = 0; sub < kWarpPos / 16; ++sub) {
      const int p0 = wn * kWarpPos + sub * 16;  // first row of these 16 positions in the tile
      const int pos0 = tile_start + p0;
      if (pos0 >= cta_end) break;  // warp-uniform
      // S = Q K^T over 16 positions: n-tiles j = 0, 1 (positions pos0 + 8j ..)
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int ks_i = 0; ks_i < kKSteps; ++ks_i) {
        uint32_t b[4];
        LdMatrixX4(b, ks + (p0 + (lane / 16) * 8 + lane % 8) * S::kRowElems + ks_i * 16 + ((lane / 8) % 2) * 8);
        Mma<T>::Run(s[0], qf[ks_i], b[0], b[1]);
        Mma<T>::Run(s[1], qf[ks_i], b[2], b[3]);
      }
      // Causal / range mask (select, never multiply), then the online softmax (log2 domain).
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int pos = pos0 + j * 8 + (lane % 4) * 2 + (e & 1);
          const float v = pos < (e < 2 ? end0 : end1) ? s[j][e] * scale_log2 : -INFINITY;
          s[j][e] = v;
          if (e < 2) mx0 = fmaxf(mx0, v);
          else mx1 = fmaxf(mx1, v);
        }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
      const float mu0 = mn0 == -INFINITY ? 0.f : mn0, mu1 = mn1 == -INFINITY ? 0.f : mn1;
      const float al0 = exp2f(m0 - mu0), al1 = exp2f(m1 - mu1);  // m = -inf: 0
      m0 = mn0;
      m1 = mn1;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        s[j][0] = exp2f(s[j][0] - mu0);
        s[j][1] = exp2f(s[j][1] - mu0);
        s[j][2] = exp2f(s[j][2] - mu1);
        s[j][3] = exp2f(s[j][3] - mu1);
      }
      l0 = l0 * al0 + (s[0][0] + s[0][1] + s[1][0] + s[1][1]);
      l1 = l1 * al1 + (s[0][2] + s[0][3] + s[1][2] + s[1][3]);
#pragma unroll
      for (int i = 0; i < kOTiles; ++i) {
        o[i][0] *= al0;
        o[i][1] *= al0;
        o[i][2] *= al1;
        o[i][3] *= al1;
      }
      // P (C layout of two n8 tiles) is the A operand of one k16 step.
      const uint32_t pa[4] = {Mma<T>::Pack(s[0][0], s[0][1]), Mma<T>::Pack(s[0][2], s[0][3]),
                              Mma<T>::Pack(s[1][0], s[1][1]), Mma<T>::Pack(s[1][2], s[1][3])};
#pragma unroll
      for (int dn = 0; dn < H / 16; ++dn) {
        uint32_t b[4];
        LdMatrixX4Trans(b, vs + (p0 + ((lane / 8) % 2) * 8 + lane % 8) * S::kRowElems + dn * 16 + (lane / 16) * 8);
        Mma<T>::Run(o[2 * dn], pa, b[0], b[1]);
        Mma<T>::Run(o[2 * dn + 1], pa, b[2], b[3]);
      }
    }
    if (tid < S::kTile) row_off[it & 1][tid] = next_off;
    __syncthreads();  // this stage is reloaded at the next iteration
  }
  CpAsyncWait<0>();

  // ---- merge the warps sharing rows, normalize, write ----
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  bad = __syncthreads_or(bad);  // also: every warp is done with the K/V stages
  float* os = reinterpret_cast<float*>(smem);  // [warp][16][kOStride]
  float* ms = os + 4 * 16 * kOStride;          // [warp][16]
  float* ls = ms + 4 * 16;                     // [warp][16]
  {
    float* base = os + warp * 16 * kOStride;
    const int rr = lane / 4, c = (lane % 4) * 2;
#pragma unroll
    for (int i = 0; i < kOTiles; ++i) {
      *reinterpret_cast<float2*>(base + rr * kOStride + i * 8 + c) = make_float2(o[i][0], o[i][1]);
      *reinterpret_cast<float2*>(base + (rr + 8) * kOStride + i * 8 + c) = make_float2(o[i][2], o[i][3]);
    }
    if (lane % 4 == 0) {
      ms[warp * 16 + rr] = m0;
      ms[warp * 16 + rr + 8] = m1;
      ls[warp * 16 + rr] = l0;
      ls[warp * 16 + rr + 8] = l1;
    }
  }
  __syncthreads();
  if (tid < kRows) {
    const int bw = tid / 16, rr = tid % 16;  // row block (wm) and row within it
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kWn; ++j) mx = fmaxf(mx, ms[(bw + j * WM) * 16 + rr]);
    const float mu = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f;
#pragma unroll
    for (int j = 0; j < kWn; ++j) lsum += exp2f(ms[(bw + j * WM) * 16 + rr] - mu) * ls[(bw + j * WM) * 16 + rr];
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
#pragma unroll
    for (int j = 0; j < kWn; ++j) row_w[tid][j] = exp2f(ms[(bw + j * WM) * 16 + rr] - mu) * inv;
    row_lse[tid] = lsum > 0.f ? mu + log2f(lsum) : -INFINITY;
  }
  __syncthreads();
  for (int i = tid; i < kRows * (H / 2); i += kThreads) {
    const int row = i / (H / 2), d = (i % (H / 2)) * 2;
    const int t = row_t[row];
    if (t < 0) continue;
    const int bw = row / 16, rr = row % 16;
    float v0 = 0.f, v1 = 0.f;
#pragma unroll
    for (int j = 0; j < kWn; ++j) {
      const float2 x = *reinterpret_cast<const float2*>(os + ((bw + j * WM) * 16 + rr) * kOStride + d);
      v0 += row_w[row][j] * x.x;
      v1 += row_w[row][j] * x.y;
    }
    if (bad) v0 = v1 = nan;
    if (direct) {
      *reinterpret_cast<uint32_t*>(OutRow<T>(p, t, row_n[row]) + d) = Mma<T>::Pack(v0, v1);
    } else {
      *reinterpret_cast<float2*>(PartialO(p, split, t, row_n[row]) + d) = make_float2(v0, v1);
      if (d == 0) *PartialLse(p, split, t, row_n[row]) = bad ? nan : row_lse[row];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

#define PJ_CUDA_RETURN_IF_ERROR(expr)                                                             \
  do {                                                                                            \
    cudaError_t pj_err_ = (expr);                                                                 \
    if (pj_err_ != cudaSuccess)                                                                   \
      return ffi::Error::Internal(std::string("pagedjax_paged_attention: ") + #expr + ": " +    \
                                  cudaGetErrorString(pj_err_));                                   \
  } while (0)

ffi::Error CheckLaunch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("pagedjax_paged_attention: launching ") + kernel + ": " +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error CheckGridY(int64_t y) {
  if (y > 65535) return detail::Invalid("too many kv heads x head chunks for one grid (" + std::to_string(y) + ")");
  return ffi::Error::Success();
}

template <typename T, int H>
ffi::Error LaunchSimt(cudaStream_t stream, const Params& p) {
  const int G = p.num_heads / p.num_kv_heads, chunks = (G + 7) / 8;
  if (ffi::Error e = CheckGridY(static_cast<int64_t>(p.num_kv_heads) * chunks); e.failure()) return e;
  dim3 grid(p.num_tokens, p.num_kv_heads * chunks, p.num_splits);
  SimtKernel<T, H><<<grid, kThreads, 0, stream>>>(p, chunks);
  return CheckLaunch("SimtKernel");
}

// Raises the dynamic shared memory limit of `kernel` once per device (needed above 48 KB).
template <typename Kernel>
ffi::Error AllowSmem(Kernel kernel, int bytes, std::atomic<bool> (&done)[64]) {
  if (bytes <= 48 * 1024) return ffi::Error::Success();
  int dev = 0;
  PJ_CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64 || !done[dev].load()) {
    PJ_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    if (dev >= 0 && dev < 64) done[dev].store(true);
  }
  return ffi::Error::Success();
}

TileArgs MakeTileArgs(int G, int rows) {
  TileArgs a;
  a.heads_per_tile = G < rows ? G : rows;
  a.tile_q = rows / a.heads_per_tile;
  a.head_chunks = (G + a.heads_per_tile - 1) / a.heads_per_tile;
  a.min_q_len = 0;
  a.max_q_len = INT_MAX;
  a.zero_padding = false;
  return a;
}

template <typename T, int H, int WM>
ffi::Error LaunchTile(cudaStream_t stream, const Params& p, const TileArgs& a) {
  static std::atomic<bool> smem_done[64];
  auto kernel = TensorCoreKernel<T, H, WM>;
  const int bytes = TcShape<H>::kSmemBytes;
  if (ffi::Error e = AllowSmem(kernel, bytes, smem_done); e.failure()) return e;
  if (ffi::Error e = CheckGridY(static_cast<int64_t>(p.num_kv_heads) * a.head_chunks); e.failure()) return e;
  dim3 grid(p.num_tokens / a.tile_q + p.num_requests + 1, p.num_kv_heads * a.head_chunks, p.num_splits);
  kernel<<<grid, kThreads, bytes, stream>>>(p, a);
  return CheckLaunch(WM == 1 ? "TensorCoreKernel (decode)" : "TensorCoreKernel (prefill)");
}

// Decode-style tiles (16 rows, warps split K/V) for requests of few query tokens, prefill-style
// tiles (64 rows) for the rest; a batch that cannot hold a longer request (T <= R, the decode
// buckets) launches only the first, which is correct for any q_len.
template <typename T, int H>
ffi::Error LaunchTensorCore(cudaStream_t stream, const Params& p) {
  const int G = p.num_heads / p.num_kv_heads;
  TileArgs dec = MakeTileArgs(G, 16), pre = MakeTileArgs(G, 64);
  const bool both = p.num_tokens > p.num_requests && p.num_tokens > dec.tile_q;
  dec.zero_padding = true;
  if (both) {
    dec.max_q_len = dec.tile_q;
    pre.min_q_len = dec.tile_q + 1;
  }
  if (ffi::Error e = LaunchTile<T, H, 1>(stream, p, dec); e.failure()) return e;
  if (both)
    if (ffi::Error e = LaunchTile<T, H, 4>(stream, p, pre); e.failure()) return e;
  return ffi::Error::Success();
}

template <typename T, int H>
ffi::Error LaunchHeadDim(cudaStream_t stream, const Params& p, bool tensor_cores) {
  if constexpr (!std::is_same_v<T, float> && H % 16 == 0 && H >= 64) {
    if (tensor_cores) return LaunchTensorCore<T, H>(stream, p);
  }
  return LaunchSimt<T, H>(stream, p);
}

// The tensor-core kernels are compiled for these head dims (bf16/f16); the rest use SIMT.
constexpr bool HasTensorCoreKernel(int h) { return h == 64 || h == 80 || h == 96 || h == 128 || h == 256; }

template <typename T>
ffi::Error LaunchAttention(cudaStream_t stream, const Params& p, bool tc) {
  switch (p.head_dim) {
    case 16: return LaunchHeadDim<T, 16>(stream, p, false);
    case 32: return LaunchHeadDim<T, 32>(stream, p, false);
    case 64: return LaunchHeadDim<T, 64>(stream, p, tc);
    case 80: return LaunchHeadDim<T, 80>(stream, p, tc);
    case 96: return LaunchHeadDim<T, 96>(stream, p, tc);
    case 128: return LaunchHeadDim<T, 128>(stream, p, tc);
    case 256: return LaunchHeadDim<T, 256>(stream, p, tc);
    default:
      return detail::Invalid("no CUDA kernel compiled for head dim " + std::to_string(p.head_dim));
  }
}

template <typename T>
ffi::Error Run(cudaStream_t stream, const Params& p, bool tc) {
  if (ffi::Error e = LaunchAttention<T>(stream, p, tc); e.failure()) return e;
  if (p.num_splits > 1) {
    dim3 grid(p.num_tokens, (p.num_heads + kThreads / 32 - 1) / (kThreads / 32));
    MergeSplitsKernel<T><<<grid, kThreads, 0, stream>>>(p);
    if (ffi::Error e = CheckLaunch("MergeSplitsKernel"); e.failure()) return e;
  }
  return ffi::Error::Success();
}

ffi::Error PagedAttentionCuda(cudaStream_t stream,
                              ffi::AnyBuffer q,                // [T, N, H] f32 | f16 | bf16
                              ffi::AnyBuffer k_pages,          // [P, page_size, K, H], q's dtype
                              ffi::AnyBuffer v_pages,          // [P, page_size, K, H], q's dtype
                              ffi::AnyBuffer block_tables,     // s32 [R, M]
                              ffi::AnyBuffer seq_lens,         // s32 [R]
                              ffi::AnyBuffer query_start_loc,  // s32 [R + 1]
                              float scale,                     // softmax scale
                              int32_t num_splits,              // split-KV partitions S (static)
                              int32_t kernel,                  // KernelChoice
                              ffi::Result<ffi::AnyBuffer> out,         // [T, N, H], q's dtype
                              ffi::Result<ffi::AnyBuffer> workspace) {  // f32 [>= S*T*N*(H+1)] if S > 1
  Params p;
  if (ffi::Error e = MakePagedAttentionParams(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc,
                                              scale, num_splits, kernel, *out, *workspace, &p);
      e.failure())
    return e;
  if (p.num_tokens == 0) return ffi::Error::Success();
  const bool tc_available = p.dtype != DType::kF32 && HasTensorCoreKernel(p.head_dim);
  bool tc = tc_available;
  switch (static_cast<KernelChoice>(kernel)) {
    case KernelChoice::kAuto: break;
    case KernelChoice::kSimt: tc = false; break;
    case KernelChoice::kTensorCore:
      if (!tc_available)
        return detail::Invalid("no tensor-core kernel for " + detail::ShapeString(q) +
                               " (bf16/f16 with head dim 64, 80, 96, 128 or 256)");
      break;
  }
  switch (p.dtype) {
    case DType::kF32: return Run<float>(stream, p, false);
    case DType::kF16: return Run<__half>(stream, p, tc);
    case DType::kBF16: return Run<__nv_bfloat16>(stream, p, tc);
  }
  return detail::Invalid("unreachable dtype");
}

}  // namespace
}  // namespace pagedjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxPagedAttentionCuda, pagedjax::PagedAttentionCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // k_pages
                                  .Arg<xla::ffi::AnyBuffer>()  // v_pages
                                  .Arg<xla::ffi::AnyBuffer>()  // block_tables
                                  .Arg<xla::ffi::AnyBuffer>()  // seq_lens
                                  .Arg<xla::ffi::AnyBuffer>()  // query_start_loc
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("num_splits")
                                  .Attr<int32_t>("kernel")
                                  .Ret<xla::ffi::AnyBuffer>()   // out
                                  .Ret<xla::ffi::AnyBuffer>(),  // workspace
                              {xla::ffi::Traits::kCmdBufferCompatible});
