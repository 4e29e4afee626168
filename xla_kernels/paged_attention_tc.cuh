// PagedAttention CUDA kernels: the tensor-core kernel (bf16/f16 queries; the pool in q's dtype or
// fp8). One CTA of 4 warps per (query tile, kv head, split). A query tile is up to 16*WM rows of
// (token, query head) of one request: the GQA group's heads of a few consecutive tokens, so K/V
// is read once per group. K/V positions stream through a two-stage cp.async pipeline in tiles of
// 64 (16-byte loads; the page table is read a tile ahead, one row per thread, into shared
// memory); S = QK^T and O += PV run on mma.sync m16n8k16 with fp32 accumulators, online softmax in
// registers. WM=1 (decode): the 4 warps share 16 rows and split each K/V tile, merging at the end.
// WM=4 (prefill): each warp owns 16 rows of a 64-row tile, sharing every K/V tile.
//
// The tiles start at the window's first position of the tile's first token (and at the split's
// start), so a long context under a sliding window reads only the window's pages; under
// TileArgs::align_start (batch_invariant) at the multiple of 64 below it. An fp8 pool is
// loaded as fp8 (half the bytes of a 16-bit one) into its own two stages; each landed tile is
// then converted through registers into one 16-bit tile (fp8 e4m3 -> f16/bf16 is exact) that the
// ldmatrix/mma code reads as for a 16-bit pool; the K scale is folded into the score, the V scale
// into the output. Included by paged_attention.cu only.
#pragma once

#include "paged_attention_common.cuh"

namespace pagedjax {
namespace kernels {

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
  bool align_start;    // K/V tiles start at a multiple of kTile (batch_invariant: the same tiles
                       // for a token whichever tokens share its query tile)
};

// Shared memory of TensorCoreKernel<T, Kv, H, WM>. A 16-bit pool lands straight in two 16-bit
// stages; an fp8 pool lands in two fp8 stages, and each tile is converted into one 16-bit tile.
template <typename Kv, int H>
struct TcShape {
  static constexpr bool kFp8 = sizeof(Kv) == 1;
  static constexpr int kTile = 64;                           // K/V positions per pipeline stage
  static constexpr int kRowElems = H + 8;                    // 16-bit row (16-byte pad: conflict-free ldmatrix)
  static constexpr int kStageElems = 2 * kTile * kRowElems;  // 16-bit K tile then V tile
  static constexpr int kRawRowBytes = kFp8 ? H + 16 : 2 * kRowElems;  // a row as cp.async lands it
  static constexpr int kRawStageBytes = 2 * kTile * kRawRowBytes;     // K tile then V tile
  static constexpr int kChunks = H * static_cast<int>(sizeof(Kv)) / 16;  // 16-byte chunks per K/V row
  static constexpr int kSmemBytes = kFp8 ? 2 * kRawStageBytes + 2 * kStageElems : 2 * kRawStageBytes;
};

// 8 fp8 e4m3 values (two 32-bit words, lowest address first) as 8 T values (four words): exact.
template <typename T>
__device__ __forceinline__ uint32_t Fp8x2ToPair(uint32_t two);  // the low 16 bits hold the two fp8
template <>
__device__ __forceinline__ uint32_t Fp8x2ToPair<__half>(uint32_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}
template <>
__device__ __forceinline__ uint32_t Fp8x2ToPair<__nv_bfloat16>(uint32_t two) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xffffu), __NV_E4M3);
  const float2 f = __half22float2(__half2(h));  // e4m3 -> f16 -> f32 -> bf16: every step exact
  return Mma<__nv_bfloat16>::Pack(f.x, f.y);
}

// T: q, out and the MMA operands (bf16/f16); Kv: the pool (T or Fp8); H: head dim; WM: 16-row
// blocks per CTA; kFixed: a fixed split size (p.split_size > 0, the invariant kernels): each split
// written as a partial (num_splits > 1), or with one split in the grid every split the CTA's rows
// see walked in order and folded (FoldStep) before the write.
template <typename T, typename Kv, int H, int WM, bool kFixed>
__global__ void __launch_bounds__(kThreads) TensorCoreKernel(const Params p, const TileArgs a) {
  static_assert(H % 16 == 0 && H <= 256, "head dim must be a multiple of 16, at most 256");
  static_assert(std::is_same_v<Kv, T> || std::is_same_v<Kv, Fp8>, "the pool is q's dtype or fp8");
  using S = TcShape<Kv, H>;
  constexpr int kRows = 16 * WM;          // query rows per CTA
  constexpr int kWn = 4 / WM;             // warps sharing a row block (splitting each K/V tile)
  constexpr int kWarpPos = S::kTile / kWn;  // positions per warp per tile
  constexpr int kChunks = S::kChunks;     // 16-byte chunks per K/V row
  constexpr int kKSteps = H / 16;
  constexpr int kOTiles = H / 8;
  constexpr int kOStride = H + 8;         // f32 row stride of the final merge buffer
  static_assert(4 * 16 * kOStride * 4 + 2 * 4 * 16 * 4 <= S::kSmemBytes, "merge buffer fits");

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int row_t[kRows], row_n[kRows], row_lo[kRows], row_end[kRows];
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
  const SplitLayout layout = mode == 0 ? SplitLayoutOf(p, req) : SplitLayout{0, 0, 0};
  // kFixed with one split in the grid: this CTA walks every split its rows see, folding them.
  const bool fold = kFixed && direct;
  if (mode == 0 && !fold && split >= layout.live) return;  // empty split: the merge skips it
  if (kFixed && mode == 0 && !direct && layout.live > p.num_splits) return;  // the merge writes NaN
  if (mode != 0 && split > 0) return;
  const int first_pos = L - (req.q_end - req.q_begin);  // position of the request's first query token

  if (tid < kRows) {
    const int tok = tid / a.heads_per_tile, g = hc * a.heads_per_tile + tid % a.heads_per_tile;
    const bool ok = tok < tile_len && g < G;
    const int t = tile_t0 + tok;
    const int pos = first_pos + (t - req.q_begin);
    row_t[tid] = ok ? t : -1;
    row_n[tid] = kh * G + g;
    // Row sees [row_lo, row_end): its window, causal (kFixed: each split clips it; otherwise
    // clipped here to this CTA's split); empty for no row.
    const int clip_lo = kFixed ? 0 : layout.base + split * layout.chunk;
    const int clip_hi = kFixed ? INT_MAX : min(L, clip_lo + layout.chunk);
    row_lo[tid] = ok && mode == 0 ? max(clip_lo, WindowLo(p, pos)) : clip_lo;
    row_end[tid] = ok && mode == 0 ? min(clip_hi, pos + 1) : clip_lo;
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
  // The positions any row of this tile attends to: from the first token's window start (the
  // earliest) to the last token's position (+1), clipped to the split. Nothing outside is read.
  // Under align_start the tiles begin at a multiple of kTile below that (the rows mask the extra
  // positions: fully masked 16-position steps leave a row's m, l and o bitwise unchanged), so a
  // row sees the same K/V steps whether its tile's first token is itself or an earlier one. A
  // split starts at a multiple of kTile (kSplitGranule) too.
  const int tile_lo = WindowLo(p, first_pos + (tile_t0 - req.q_begin));
  const int tile_end = first_pos + (tile_t0 + tile_len - 1 - req.q_begin) + 1;
  int sp = split, s_end = split + 1;  // the splits this CTA walks: its own, or (fold) each one its rows see
  if (fold) {
    sp = max(tile_lo - layout.base, 0) / layout.chunk;  // holds tile_lo: the first row sees it
    s_end = min(layout.live, (tile_end - 1 - layout.base) / layout.chunk + 1);
  }
  int lo = layout.base + sp * layout.chunk, hi = min(L, lo + layout.chunk);
  int window_start = max(lo, tile_lo);
  int cta_start = a.align_start ? window_start / S::kTile * S::kTile : window_start;
  int cta_end = min(hi, tile_end);

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
  // kFixed: the rows' windows, clipped to each split in turn; otherwise clipped already
  const int wlo0 = row_lo[r0], wlo1 = row_lo[r1], pend0 = row_end[r0], pend1 = row_end[r1];
  int lo0 = kFixed ? max(wlo0, lo) : wlo0, end0 = kFixed ? min(pend0, hi) : pend0;
  int lo1 = kFixed ? max(wlo1, lo) : wlo1, end1 = kFixed ? min(pend1, hi) : pend1;
  const Scorer score = MakeScorer(p, kh);
  const float v_mul = __ldg(p.v_scale + kh);

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows r0, r1 (l: this thread's part)
  float o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  // 16-bit pools: the stages are the tiles the MMAs read; fp8: raw stages, then one 16-bit tile.
  T* tile16 = reinterpret_cast<T*>(smem + (S::kFp8 ? 2 * S::kRawStageBytes : 0));
  const unsigned char* kp = static_cast<const unsigned char*>(p.k_pages);
  const unsigned char* vp = static_cast<const unsigned char*>(p.v_pages);
  bool bad = false;
  // The fold's state: per row the max and the weight, per (row, d) the accumulator, past the
  // kernel's shared memory (the launch adds FoldSmemBytes). Each thread owns the same (row, d)
  // pairs in every split's write loop below.
  float* fold_acc = reinterpret_cast<float*>(smem + S::kSmemBytes);  // [kRows][H]
  float* fold_mx = fold_acc + kRows * H;                               // [kRows]
  float* fold_w = fold_mx + kRows;                                     // [kRows]
  __shared__ FoldWeights row_fold[kRows];
  if (fold) {
    for (int i = tid; i < kRows * H; i += kThreads) fold_acc[i] = 0.f;
    if (tid < kRows) {
      fold_mx[tid] = -INFINITY;
      fold_w[tid] = 0.f;
    }
  }

  __shared__ int64_t row_off[2][S::kTile];  // [stage][row]
  // Element offset of row `tid` of the tile at `start` (threads < kTile): -2 outside
  // [window_start, cta_end) (zeros: under align_start no page before the window is read),
  // -1 for a bad page id. Looked up a tile ahead into row_off, so the block-table read is in
  // flight during a tile's compute; read beside each cp.async instead, every cp.async waits on its
  // read (they alternate in the PTX): 8 dependent round trips per thread per tile.
  auto row_offset = [&](int start) -> int64_t {
    const int pos = start + tid;
    return tid < S::kTile && pos >= window_start && pos < cta_end ? KvOffset(p, r, pos, kh) : -2;
  };
  // Stage `stage` <- the tile whose offsets are in row_off[stage]; rows with off < 0 are zeros.
  auto load_tile = [&](int stage) {
    unsigned char* ks = smem + stage * S::kRawStageBytes;
    unsigned char* vs = ks + S::kTile * S::kRawRowBytes;
    constexpr int kLoads = S::kTile * kChunks;
#pragma unroll
    for (int i = 0; i < (kLoads + kThreads - 1) / kThreads; ++i) {
      const int c = tid + i * kThreads, row = c / kChunks, col = (c % kChunks) * 16;  // col in bytes
      if (kLoads % kThreads != 0 && c >= kLoads) break;
      unsigned char* kd = ks + row * S::kRawRowBytes + col;
      unsigned char* vd = vs + row * S::kRawRowBytes + col;
      const int64_t off = row_off[stage][row];
      if (off >= 0) {
        const int64_t at = off * static_cast<int64_t>(sizeof(Kv)) + col;
        CpAsync16(kd, kp + at);
        CpAsync16(vd, vp + at);
      } else {
        bad |= off == -1;
        *reinterpret_cast<uint4*>(kd) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(vd) = make_uint4(0, 0, 0, 0);
      }
    }
  };
  // fp8 only: the landed stage -> tile16, 16 values per thread and step, through registers.
  auto convert_tile = [&](int stage) {
    const unsigned char* raw = smem + stage * S::kRawStageBytes;  // 2 * kTile rows: K then V
    constexpr int kConverts = 2 * S::kTile * kChunks;
    for (int c = tid; c < kConverts; c += kThreads) {
      const int row = c / kChunks, col = (c % kChunks) * 16;
      const uint4 x = *reinterpret_cast<const uint4*>(raw + row * S::kRawRowBytes + col);
      uint4* dst = reinterpret_cast<uint4*>(tile16 + row * S::kRowElems + col);
      dst[0] = make_uint4(Fp8x2ToPair<T>(x.x), Fp8x2ToPair<T>(x.x >> 16), Fp8x2ToPair<T>(x.y),
                          Fp8x2ToPair<T>(x.y >> 16));
      dst[1] = make_uint4(Fp8x2ToPair<T>(x.z), Fp8x2ToPair<T>(x.z >> 16), Fp8x2ToPair<T>(x.w),
                          Fp8x2ToPair<T>(x.w >> 16));
    }
  };

  while (true) {  // one split per pass: one pass, or (fold) each split the rows see in turn
    const int num_tiles = cta_end > cta_start ? (cta_end - cta_start + S::kTile - 1) / S::kTile : 0;
    if (tid < S::kTile) {
      const int64_t off0 = row_offset(cta_start), off1 = row_offset(cta_start + S::kTile);  // both in flight
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
      const int64_t next_off = row_offset(cta_start + (it + 2) * S::kTile);
      CpAsyncWait<1>();  // tile `it` has landed (only the newest group may be in flight)
      __syncthreads();
      if constexpr (S::kFp8) {
        convert_tile(it & 1);  // tile16's last readers are behind the barrier ending iteration it - 1
        __syncthreads();
      }
      const T* ks = S::kFp8 ? tile16 : reinterpret_cast<const T*>(smem + (it & 1) * S::kRawStageBytes);
      const T* vs = ks + S::kTile * S::kRowElems;
      const int tile_start = cta_start + it * S::kTile;
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
        // Score (scale, K scale, soft-cap), then the window / causal / range mask (select, never
        // multiply), then the online softmax (log2 domain).
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int pos = pos0 + j * 8 + (lane % 4) * 2 + (e & 1);
            const bool seen = e < 2 ? (pos >= lo0 && pos < end0) : (pos >= lo1 && pos < end1);
            const float v = seen ? score(s[j][e] * score.mul) : -INFINITY;
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

    // ---- merge the warps sharing rows, normalize; write, or keep as a partial, or fold ----
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
      if (fold) row_fold[tid] = FoldStep(fold_mx[tid], fold_w[tid], row_lse[tid]);
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
      v0 *= v_mul;  // the pool's V scale (ones unless fp8)
      v1 *= v_mul;
      if (bad) v0 = v1 = nan;
      if (fold) {  // this thread owns (row, d) and (row, d + 1) in every split
        float* acc = fold_acc + row * H + d;
        acc[0] = FoldAcc(acc[0], row_fold[row], v0);
        acc[1] = FoldAcc(acc[1], row_fold[row], v1);
      } else if (direct) {
        *reinterpret_cast<uint32_t*>(OutRow<T>(p, t, row_n[row]) + d) = Mma<T>::Pack(v0, v1);
      } else {
        *reinterpret_cast<float2*>(PartialO(p, split, t, row_n[row]) + d) = make_float2(v0, v1);
        if (d == 0) *PartialLse(p, split, t, row_n[row]) = bad ? nan : row_lse[row];
      }
    }
    if (!fold) break;
    __syncthreads();  // the next split reuses the stages, row_w and row_fold
    if (++sp >= s_end) break;
    lo = layout.base + sp * layout.chunk;
    hi = min(L, lo + layout.chunk);
    window_start = max(lo, tile_lo);
    cta_start = a.align_start ? window_start / S::kTile * S::kTile : window_start;
    cta_end = min(hi, tile_end);
    lo0 = max(wlo0, lo);
    end0 = min(pend0, hi);
    lo1 = max(wlo1, lo);
    end1 = min(pend1, hi);
    m0 = m1 = -INFINITY;
    l0 = l1 = 0.f;
#pragma unroll
    for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  }
  if (fold) {  // every split folded: normalize and write (each thread its own pairs)
    for (int i = tid; i < kRows * (H / 2); i += kThreads) {
      const int row = i / (H / 2), d = (i % (H / 2)) * 2;
      const int t = row_t[row];
      if (t < 0) continue;
      const float* acc = fold_acc + row * H + d;
      const float w = fold_w[row];
      const float v0 = bad ? nan : FoldOut(acc[0], w), v1 = bad ? nan : FoldOut(acc[1], w);
      *reinterpret_cast<uint32_t*>(OutRow<T>(p, t, row_n[row]) + d) = Mma<T>::Pack(v0, v1);
    }
  }
}

// Dynamic shared memory the fold adds to TensorCoreKernel<T, Kv, H, WM, true> (one CTA walking
// every split): the accumulators [16 * WM][H] and per row the max and the weight.
template <int H, int WM>
constexpr int FoldSmemBytes() {
  return (16 * WM * H + 2 * 16 * WM) * 4;
}

}  // namespace kernels
}  // namespace pagedjax
