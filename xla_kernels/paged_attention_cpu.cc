// PagedAttention over a ragged batch: the CPU handler (FFI target "pagedjax_paged_attention", cpu).
//
// Same operands, attributes and results as the CUDA handler (paged_attention.cu); it ignores the
// split-KV workspace, the fixed split size and the kernel choice, and checks the metadata and
// scales on the host: a request whose lengths or page ids are out of range is an error, not a
// wrong answer.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "float_convert.h"
#include "paged_attention.h"
#include "xla/ffi/api/ffi.h"

namespace pagedjax {
namespace {

namespace ffi = xla::ffi;

struct F32 {
  using T = float;
  static float Load(T x) { return x; }
  static T Store(float x) { return x; }
};
struct F16 {
  using T = uint16_t;
  static float Load(T x) { return HalfToFloat(x); }
  static T Store(float x) { return FloatToHalf(x); }
};
struct BF16 {
  using T = uint16_t;
  static float Load(T x) { return Bf16ToFloat(x); }
  static T Store(float x) { return FloatToBf16(x); }
};
struct FP8 {  // the FP8 KV cache (read only here)
  using T = uint8_t;
  static float Load(T x) { return Fp8E4M3ToFloat(x); }
};

// ---- host checks of the device metadata ----

ffi::Error CheckMetadata(const PagedAttentionParams& p) {
  const int32_t* qsl = p.query_start_loc;
  const int R = p.num_requests;
  auto bad = [](const std::string& what) { return detail::Invalid(what); };
  for (int kh = 0; kh < p.num_kv_heads; ++kh)
    for (const float s : {p.k_scale[kh], p.v_scale[kh]})
      if (!std::isfinite(s) || s <= 0.f)
        return bad("k_scale and v_scale must be finite and > 0, got " + std::to_string(s) + " for kv head " +
                   std::to_string(kh));
  if (qsl[0] < 0 || qsl[R] > p.num_tokens)
    return bad("query_start_loc must lie in [0, T=" + std::to_string(p.num_tokens) + "], got [" +
               std::to_string(qsl[0]) + ", ..., " + std::to_string(qsl[R]) + "]");
  const int64_t max_len = static_cast<int64_t>(p.max_pages) * p.page_size;
  for (int r = 0; r < R; ++r) {
    const int q_len = qsl[r + 1] - qsl[r], L = p.seq_lens[r];
    if (q_len < 0) return bad("query_start_loc must be non-decreasing (request " + std::to_string(r) + ")");
    if (L < 0 || L > max_len)
      return bad("seq_lens[" + std::to_string(r) + "] = " + std::to_string(L) + " is outside [0, " +
                 std::to_string(max_len) + "] (max pages * page size)");
    if (q_len > L)
      return bad("request " + std::to_string(r) + " has " + std::to_string(q_len) +
                 " query tokens but seq_len " + std::to_string(L));
    if (q_len == 0) continue;  // padded request: its pages are never read
    const int pages = (L + p.page_size - 1) / p.page_size;
    for (int j = 0; j < pages; ++j) {
      const int32_t page = p.block_tables[static_cast<int64_t>(r) * p.bt_stride + j];
      if (page < 0 || page >= p.num_pages)
        return bad("block_tables[" + std::to_string(r) + ", " + std::to_string(j) + "] = " +
                   std::to_string(page) + " is not a page id in [0, " + std::to_string(p.num_pages) + ")");
    }
  }
  return ffi::Error::Success();
}

// Runs fn(0..n-1) on the intra-op pool and the calling thread. The caller waits only for items that
// were claimed, so this never deadlocks, even when the pool has no free thread.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  const int64_t threads = pool.num_threads();
  if (n <= 1 || threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    const std::function<void(int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = &fn;
  auto work = [state] {
    for (;;) {
      const int64_t i = state->next.fetch_add(1);
      if (i >= state->n) return;  // late helpers stop here, before touching fn
      (*state->fn)(i);
      if (state->done.fetch_add(1) + 1 == state->n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < std::min(threads, n - 1); ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->n; });
}

constexpr int kKvBlock = 64;  // positions converted to f32 at a time

inline float Dot(const float* a, const float* b, int h) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int d = 0;
  for (; d + 4 <= h; d += 4) {
    s0 += a[d] * b[d];
    s1 += a[d + 1] * b[d + 1];
    s2 += a[d + 2] * b[d + 2];
    s3 += a[d + 3] * b[d + 3];
  }
  for (; d < h; ++d) s0 += a[d] * b[d];
  return (s0 + s1) + (s2 + s3);
}

// One request and one kv head: its query tokens x the G query heads of the group, online softmax
// over blocks of the positions some token of the request sees (the window's, when there is one).
template <typename E, typename EKV>
void AttendRequestKvHead(const PagedAttentionParams& p, int r, int kh) {
  using T = typename E::T;
  using TKV = typename EKV::T;
  const int H = p.head_dim, G = p.num_heads / p.num_kv_heads, W = p.sliding_window;
  const int q0 = p.query_start_loc[r], q_len = p.query_start_loc[r + 1] - q0;
  const int L = p.seq_lens[r], first_pos = L - q_len;
  const float cap = p.logit_softcap;
  const T* q = static_cast<const T*>(p.q);
  const TKV* kp = static_cast<const TKV*>(p.k_pages);
  const TKV* vp = static_cast<const TKV*>(p.v_pages);
  T* out = static_cast<T*>(p.out);
  // The pool's scales fold into q (K) and the output (V): s = scale * q.(k8 * ks) = (scale * ks) q.k8.
  const float q_mul = p.scale * p.k_scale[kh], v_mul = p.v_scale[kh];

  const int rows = q_len * G;  // row = i * G + g
  std::vector<float> qf(static_cast<size_t>(rows) * H), acc(static_cast<size_t>(rows) * H, 0.f);
  std::vector<float> m(rows, -std::numeric_limits<float>::infinity()), l(rows, 0.f);
  for (int i = 0; i < q_len; ++i)
    for (int g = 0; g < G; ++g) {
      const T* src = q + (q0 + i) * p.q_stride_token + (kh * G + g) * p.q_stride_head;
      float* dst = &qf[(static_cast<size_t>(i) * G + g) * H];
      for (int d = 0; d < H; ++d) dst[d] = E::Load(src[d]) * q_mul;
    }

  // Token i (position first_pos + i) sees [lo_i, first_pos + i]: lo_i = 0, or the window's start.
  auto window_lo = [&](int pos) { return W > 0 ? std::max(0, pos - W + 1) : 0; };
  std::vector<float> kf(static_cast<size_t>(kKvBlock) * H), vf(static_cast<size_t>(kKvBlock) * H), s(kKvBlock);
  // Blocks start at multiples of kKvBlock (positions before the block of the first token's window
  // start are never read), so a token's online softmax runs over the same blocks in the same order
  // however its prompt was chunked: a prefill chunk and a decode step compute it alike.
  for (int b0 = window_lo(first_pos) / kKvBlock * kKvBlock; b0 < L; b0 += kKvBlock) {
    const int nb = std::min(kKvBlock, L - b0);
    for (int j = 0; j < nb; ++j) {
      const int pos = b0 + j;
      const int64_t page = p.block_tables[static_cast<int64_t>(r) * p.bt_stride + pos / p.page_size];
      const int64_t off = page * p.kv_stride_page + (pos % p.page_size) * p.kv_stride_token + kh * p.kv_stride_head;
      for (int d = 0; d < H; ++d) {
        kf[static_cast<size_t>(j) * H + d] = EKV::Load(kp[off + d]);
        vf[static_cast<size_t>(j) * H + d] = EKV::Load(vp[off + d]);
      }
    }
    for (int i = 0; i < q_len; ++i) {
      const int pos = first_pos + i;
      const int j0 = std::max(0, window_lo(pos) - b0), j1 = std::min(nb, pos + 1 - b0);  // [j0, j1) seen
      if (j0 >= j1) continue;
      for (int g = 0; g < G; ++g) {
        const int row = i * G + g;
        const float* qr = &qf[static_cast<size_t>(row) * H];
        float mx = -std::numeric_limits<float>::infinity();
        for (int j = j0; j < j1; ++j) {
          float x = Dot(qr, &kf[static_cast<size_t>(j) * H], H);
          if (cap > 0.f) x = cap * std::tanh(x / cap);
          s[j] = x;
          mx = std::max(mx, x);
        }
        const float m_new = std::max(m[row], mx);
        const float alpha = std::exp(m[row] - m_new);  // m = -inf before the first block: alpha = 0
        float* a = &acc[static_cast<size_t>(row) * H];
        float sum = 0.f;
        for (int d = 0; d < H; ++d) a[d] *= alpha;
        for (int j = j0; j < j1; ++j) {
          const float pj = std::exp(s[j] - m_new);
          sum += pj;
          const float* vr = &vf[static_cast<size_t>(j) * H];
          for (int d = 0; d < H; ++d) a[d] += pj * vr[d];
        }
        l[row] = l[row] * alpha + sum;
        m[row] = m_new;
      }
    }
  }
  for (int i = 0; i < q_len; ++i)
    for (int g = 0; g < G; ++g) {
      const int row = i * G + g;
      const float inv = l[row] > 0.f ? v_mul / l[row] : 0.f;  // l > 0: every token sees itself
      T* dst = out + (q0 + i) * p.out_stride_token + (kh * G + g) * p.out_stride_head;
      const float* a = &acc[static_cast<size_t>(row) * H];
      for (int d = 0; d < H; ++d) dst[d] = E::Store(a[d] * inv);
    }
}

template <typename E, typename EKV>
void Run(ffi::ThreadPool& pool, const PagedAttentionParams& p) {
  using T = typename E::T;
  T* out = static_cast<T*>(p.out);
  const int R = p.num_requests, K = p.num_kv_heads;
  const int q_first = p.query_start_loc[0], q_end = p.query_start_loc[R];
  // Padding tokens (outside every request) get zeros.
  std::fill(out, out + static_cast<int64_t>(q_first) * p.out_stride_token, E::Store(0.f));
  std::fill(out + static_cast<int64_t>(q_end) * p.out_stride_token,
            out + static_cast<int64_t>(p.num_tokens) * p.out_stride_token, E::Store(0.f));
  std::vector<int> items;  // r * K + kh, requests with query tokens only
  for (int r = 0; r < R; ++r)
    if (p.query_start_loc[r + 1] > p.query_start_loc[r])
      for (int kh = 0; kh < K; ++kh) items.push_back(r * K + kh);
  ParallelFor(pool, static_cast<int64_t>(items.size()),
              [&](int64_t i) { AttendRequestKvHead<E, EKV>(p, items[i] / K, items[i] % K); });
}

ffi::Error PagedAttentionCpu(ffi::ThreadPool pool,
                             ffi::AnyBuffer q,                // [T, N, H] f32 | f16 | bf16
                             ffi::AnyBuffer k_pages,          // [P, page_size, K, H], q's dtype
                             ffi::AnyBuffer v_pages,          // [P, page_size, K, H], q's dtype
                             ffi::AnyBuffer block_tables,     // s32 [R, M]
                             ffi::AnyBuffer seq_lens,         // s32 [R]
                             ffi::AnyBuffer query_start_loc,  // s32 [R + 1]
                             ffi::AnyBuffer k_scale,          // f32 [K] (ones unless the pool is fp8)
                             ffi::AnyBuffer v_scale,          // f32 [K]
                             float scale,                     // softmax scale
                             int32_t num_splits,              // split-KV partitions (CUDA only)
                             int32_t split_size,              // fixed split size (CUDA only)
                             int32_t kernel,                  // KernelChoice (CUDA only)
                             int32_t sliding_window,          // W (0: none)
                             float logit_softcap,             // c (0: none)
                             ffi::Result<ffi::AnyBuffer> out,         // [T, N, H], q's dtype
                             ffi::Result<ffi::AnyBuffer> workspace) {  // f32 [W] (CUDA split-KV)
  PagedAttentionParams p;
  if (ffi::Error e = MakePagedAttentionParams(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc,
                                              k_scale, v_scale, scale, num_splits, split_size, kernel, sliding_window,
                                              logit_softcap, *out, *workspace, &p);
      e.failure())
    return e;
  if (ffi::Error e = CheckMetadata(p); e.failure()) return e;
  const bool fp8 = p.kv_dtype == KvDType::kFp8E4M3;
  switch (p.dtype) {
    case DType::kF32: fp8 ? Run<F32, FP8>(pool, p) : Run<F32, F32>(pool, p); break;
    case DType::kF16: fp8 ? Run<F16, FP8>(pool, p) : Run<F16, F16>(pool, p); break;
    case DType::kBF16: fp8 ? Run<BF16, FP8>(pool, p) : Run<BF16, BF16>(pool, p); break;
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pagedjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxPagedAttentionCpu, pagedjax::PagedAttentionCpu,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()  // q
                                  .Arg<xla::ffi::AnyBuffer>()  // k_pages
                                  .Arg<xla::ffi::AnyBuffer>()  // v_pages
                                  .Arg<xla::ffi::AnyBuffer>()  // block_tables
                                  .Arg<xla::ffi::AnyBuffer>()  // seq_lens
                                  .Arg<xla::ffi::AnyBuffer>()  // query_start_loc
                                  .Arg<xla::ffi::AnyBuffer>()  // k_scale
                                  .Arg<xla::ffi::AnyBuffer>()  // v_scale
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("num_splits")
                                  .Attr<int32_t>("split_size")
                                  .Attr<int32_t>("kernel")
                                  .Attr<int32_t>("sliding_window")
                                  .Attr<float>("logit_softcap")
                                  .Ret<xla::ffi::AnyBuffer>()   // out
                                  .Ret<xla::ffi::AnyBuffer>());  // workspace
