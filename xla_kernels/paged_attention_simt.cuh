// PagedAttention CUDA kernels: the SIMT kernel, one CTA per (token, kv head, head chunk of <= 8,
// split), for any q dtype (f32 included) and a pool in q's dtype or fp8. K/V tiles are staged in
// shared memory as f32 (fp8 converted exactly on the way); the kernel reads only the positions
// its token sees (its window's and its split's), the rest of the context never leaves HBM.
// Included by paged_attention.cu only.
#pragma once

#include "paged_attention_common.cuh"

namespace pagedjax {
namespace kernels {

// T: q and out; Kv: the pool (T or Fp8); H: head dim.
template <typename T, typename Kv, int H>
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
  const SplitLayout layout = SplitLayoutOf(p, req);
  if (split >= layout.live) return;  // empty split: the merge skips it
  const int lo = layout.base + split * layout.chunk;
  const int t_pos = L - (req.q_end - req.q_begin) + (t - req.q_begin);  // this token's position
  const int hi = min(min(L, lo + layout.chunk), t_pos + 1);            // causal
  const int start = max(lo, WindowLo(p, t_pos));                       // sliding window

  const Scorer score = MakeScorer(p, kh);
  const float v_mul = __ldg(p.v_scale + kh);
  const T* q = static_cast<const T*>(p.q);
  for (int i = tid; i < kMaxG * H; i += kThreads) {
    const int g = i / H, d = i % H;
    qs[g][d] = g < gn ? Io<T>::Load(q[t * p.q_stride_token + (n0 + g) * p.q_stride_head + d]) * score.mul : 0.f;
  }
  if (tid < kMaxG) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
  bool bad = false;
  const Kv* kp = static_cast<const Kv*>(p.k_pages);
  const Kv* vp = static_cast<const Kv*>(p.v_pages);

  for (int tile0 = start; tile0 < hi; tile0 += kTk) {
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
      ks[j][d] = off >= 0 ? Io<Kv>::Load(kp[off + d]) : 0.f;
      vs[j][d] = off >= 0 ? Io<Kv>::Load(vp[off + d]) : 0.f;  // never multiply garbage by a zero weight
    }
    __syncthreads();
    for (int i = tid; i < kMaxG * kTk; i += kThreads) {
      const int g = i / kTk, j = i % kTk;
      float s = -INFINITY;
      if (g < gn && tile0 + j < hi) {
        s = 0.f;
#pragma unroll 8
        for (int d = 0; d < H; ++d) s += qs[g][d] * ks[j][d];
        s = score(s);
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
    const float o = bad ? nan : (l > 0.f ? acc[i] * v_mul / l : 0.f);
    if (direct) {
      OutRow<T>(p, t, n0 + g)[d] = Io<T>::Store(o);
    } else {
      PartialO(p, split, t, n0 + g)[d] = o;
      if (d == 0) *PartialLse(p, split, t, n0 + g) = bad ? nan : (l > 0.f ? m_s[g] + log2f(l) : -INFINITY);
    }
  }
}

}  // namespace kernels
}  // namespace pagedjax
