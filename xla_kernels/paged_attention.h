// PagedAttention over a ragged batch: what every kernel sees, and the checks every handler shares.
//
// Dims: T tokens in the flat batch, R requests, N query heads, K kv heads (GQA group G = N / K),
// H head dim, P pages, M max pages per request, S split-KV partitions.
//
// Request r owns flat tokens [query_start_loc[r], query_start_loc[r+1]); its context holds
// seq_lens[r] tokens (cached + this step's), the new ones last, so token j of its query sits at
// position seq_lens[r] - q_len + j and attends causally to positions 0..itself. Position p lives
// in page block_tables[r, p / page_size], row p % page_size. Tokens at index >= query_start_loc[R]
// are padding: their output is zero.
//
// Per call, as static attributes: a sliding window W (0: none) keeps only keys at positions
// p - W < k <= p (HF transformers' sliding_window_overlay, vLLM); a logit soft-cap c (0: none)
// turns each scaled score s = scale * q.k into c * tanh(s / c) before masking and softmax (Gemma 2).
// The pool is either q's dtype or float8_e4m3fn (the FP8 KV cache): then its values are read as
// f32(stored) * k_scale[kv head] (v_scale for V); the scales are f32 [K] operands, ones otherwise.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace pagedjax {

// Head dims every handler accepts (CPU and CUDA, all dtypes). The extension exports this table
// and the next to Python (module.cc); the CUDA launch switches cover exactly these.
inline constexpr int kSupportedHeadDims[] = {16, 32, 64, 80, 96, 128, 256};
// Head dims the CUDA tensor-core kernels are compiled for (bf16/f16 queries; the pool in q's dtype
// or fp8); the other head dims and f32 queries run the SIMT kernel.
inline constexpr int kTensorCoreHeadDims[] = {64, 80, 96, 128, 256};
// Split-KV partitions start at multiples of this many positions (kernels and merge agree on it).
inline constexpr int kSplitGranule = 64;
inline constexpr int kMaxSplits = 256;

enum class DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };
// The pool's element type: q's dtype, or float8_e4m3fn with per-kv-head scales.
enum class KvDType : int32_t { kSameAsQ = 0, kFp8E4M3 = 1 };
// The `kernel` attribute: which CUDA kernel family runs (the CPU handler has one). kInvariant
// (batch_invariant): every token's sums in the same order whatever its batch, chunk or neighbours:
// the tensor-core kernel's 64-row tiles for every request (decodes included), its K/V tiles at
// multiples of 64 positions, unsplit; SIMT where no tensor-core kernel applies. num_splits must be 1.
// kInvariant16: the same guarantee on the decode kernel's 16-row tiles for every request (prefills
// included): a row's positions go to the warp of their 16-position step within the 64-aligned K/V
// tile, and the four warps' partial sums merge in one order. num_splits must be 1.
// Both take a fixed split size (split_size > 0, a multiple of kSplitGranule): a token's context is
// cut at multiples of split_size positions, whatever its batch, and its splits' partials are folded
// in position order (FoldStep). Split across CTAs (num_splits > 1, merged by MergeSplitsKernel) or
// walked one after another by one CTA (num_splits == 1), a token gets the same bits; the caller
// picks either per call. Only the tensor-core kernels fold: the handler refuses split_size where
// SIMT would run.
enum class KernelChoice : int32_t { kAuto = 0, kSimt = 1, kTensorCore = 2, kInvariant = 3, kInvariant16 = 4 };

// All a kernel sees. Offsets are in elements; every array is row-major as laid out above.
struct PagedAttentionParams {
  const void* q;                   // [T, N, H]
  const void* k_pages;             // [P, page_size, K, H]
  const void* v_pages;             // [P, page_size, K, H]
  const int32_t* block_tables;     // [R, M] page ids
  const int32_t* seq_lens;         // [R]
  const int32_t* query_start_loc;  // [R + 1]
  const float* k_scale;            // [K] K dequantization scale (ones unless the pool is fp8)
  const float* v_scale;            // [K] V dequantization scale
  void* out;                       // [T, N, H], q's dtype
  float* workspace;                // split-KV partials: o [S, T, N, H], then lse (log2) [S, T, N]

  int64_t q_stride_token, q_stride_head;                     // N * H, H
  int64_t kv_stride_page, kv_stride_token, kv_stride_head;   // page_size * K * H, K * H, H
  int64_t out_stride_token, out_stride_head;                 // N * H, H
  int64_t bt_stride;                                         // M

  int num_tokens, num_heads, num_kv_heads, head_dim;
  int num_pages, page_size, num_requests, max_pages;
  int num_splits;
  int split_size;       // > 0: fixed split size and the fold (kInvariant, kInvariant16); 0: S equal parts
  float scale;          // softmax scale (applied to q.k)
  int sliding_window;   // W > 0: keys at p - W < k <= p only; 0: none
  float logit_softcap;  // c > 0: scores c * tanh(s / c); 0: none
  DType dtype;          // q and out
  KvDType kv_dtype;     // the pool
};

// Elements of f32 workspace the handlers need for `num_splits` (at least 1, never a null buffer).
inline int64_t WorkspaceElements(int64_t num_splits, int64_t tokens, int64_t heads, int64_t head_dim) {
  if (num_splits <= 1) return 1;
  return num_splits * tokens * heads * (head_dim + 1);
}

inline bool IsSupportedHeadDim(int64_t h) {
  for (int d : kSupportedHeadDims)
    if (d == h) return true;
  return false;
}

inline bool HasTensorCoreHeadDim(int64_t h) {
  for (int d : kTensorCoreHeadDims)
    if (d == h) return true;
  return false;
}

// With an fp8 pool the tensor-core kernel runs these head dims only: at 80 and 96 its fp8 prefill
// tile failed to launch on the H200 (2026-12-04, "invalid argument"), so SIMT serves them.
inline constexpr int kTensorCoreFp8HeadDims[] = {64, 128, 256};

inline bool HasTensorCoreKernel(int64_t h, bool fp8_pool) {
  if (!fp8_pool) return HasTensorCoreHeadDim(h);
  for (int d : kTensorCoreFp8HeadDims)
    if (d == h) return true;
  return false;
}

namespace detail {

namespace ffi = xla::ffi;

inline std::string ShapeString(const ffi::AnyBuffer& b) {
  std::string s;
  switch (b.element_type()) {
    case ffi::DataType::F32: s = "f32"; break;
    case ffi::DataType::F16: s = "f16"; break;
    case ffi::DataType::BF16: s = "bf16"; break;
    case ffi::DataType::S32: s = "s32"; break;
    case ffi::DataType::S64: s = "s64"; break;
    case ffi::DataType::F64: s = "f64"; break;
    case ffi::DataType::F8E4M3FN: s = "f8e4m3fn"; break;
    default: s = "dtype#" + std::to_string(static_cast<int>(b.element_type())); break;
  }
  s += "[";
  auto dims = b.dimensions();
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

// "a, b, c": a table of head dims, for error messages.
template <size_t N>
inline std::string JoinDims(const int (&dims)[N]) {
  std::string s;
  for (int d : dims) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return s;
}

inline ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("pagedjax_paged_attention: " + what);
}

}  // namespace detail

// Checks every static property of the call (ranks, dtypes, shapes, attributes) and fills `p`.
// Device data (page ids, lengths) is not read here: the CPU handler checks it on the host, the
// CUDA kernels guard every access and write NaN for a request whose metadata is out of range.
inline xla::ffi::Error MakePagedAttentionParams(
    const xla::ffi::AnyBuffer& q, const xla::ffi::AnyBuffer& k_pages,
    const xla::ffi::AnyBuffer& v_pages, const xla::ffi::AnyBuffer& block_tables,
    const xla::ffi::AnyBuffer& seq_lens, const xla::ffi::AnyBuffer& query_start_loc,
    const xla::ffi::AnyBuffer& k_scale, const xla::ffi::AnyBuffer& v_scale, float scale, int32_t num_splits,
    int32_t split_size, int32_t kernel, int32_t sliding_window, float logit_softcap, xla::ffi::AnyBuffer out,
    xla::ffi::AnyBuffer workspace, PagedAttentionParams* p) {
  namespace ffi = xla::ffi;
  using detail::Invalid;
  using detail::ShapeString;
  auto qd = q.dimensions(), kd = k_pages.dimensions(), vd = v_pages.dimensions();
  auto btd = block_tables.dimensions(), sld = seq_lens.dimensions(), qsd = query_start_loc.dimensions();

  if (qd.size() != 3) return Invalid("q must be [T, N, H], got " + ShapeString(q));
  if (kd.size() != 4) return Invalid("k_pages must be [P, page_size, K, H], got " + ShapeString(k_pages));
  if (vd.size() != 4) return Invalid("v_pages must be [P, page_size, K, H], got " + ShapeString(v_pages));
  ffi::DataType dt = q.element_type();
  DType dtype;
  switch (dt) {
    case ffi::DataType::F32: dtype = DType::kF32; break;
    case ffi::DataType::F16: dtype = DType::kF16; break;
    case ffi::DataType::BF16: dtype = DType::kBF16; break;
    default: return Invalid("q must be f32, f16 or bf16, got " + ShapeString(q));
  }
  const ffi::DataType kv_dt = k_pages.element_type();
  if ((kv_dt != dt && kv_dt != ffi::DataType::F8E4M3FN) || v_pages.element_type() != kv_dt)
    return Invalid("k_pages and v_pages must share a dtype, q's or f8e4m3fn (the FP8 KV cache), got q " +
                   ShapeString(q) + ", k_pages " + ShapeString(k_pages) + ", v_pages " + ShapeString(v_pages));
  for (size_t i = 0; i < 4; ++i)
    if (kd[i] != vd[i])
      return Invalid("k_pages and v_pages must have one shape, got " + ShapeString(k_pages) + " and " +
                     ShapeString(v_pages));
  const int64_t T = qd[0], N = qd[1], H = qd[2];
  const int64_t P = kd[0], page_size = kd[1], K = kd[2];
  if (kd[3] != H)
    return Invalid("head dim of q and k_pages differ: " + ShapeString(q) + " vs " + ShapeString(k_pages));
  if (!IsSupportedHeadDim(H)) {
    return Invalid("head dim " + std::to_string(H) + " is not supported (supported: " +
                   detail::JoinDims(kSupportedHeadDims) + ")");
  }
  if (K < 1 || N < 1 || N % K != 0)
    return Invalid("query heads (" + std::to_string(N) + ") must be a positive multiple of kv heads (" +
                   std::to_string(K) + ")");
  if (P < 1 || page_size < 1) return Invalid("the page pool is empty: " + ShapeString(k_pages));

  for (const auto* b : {&block_tables, &seq_lens, &query_start_loc})
    if (b->element_type() != ffi::DataType::S32)
      return Invalid("block_tables, seq_lens and query_start_loc must be int32, got " + ShapeString(*b));
  if (btd.size() != 2) return Invalid("block_tables must be [R, M], got " + ShapeString(block_tables));
  const int64_t R = btd[0], M = btd[1];
  if (M < 1) return Invalid("block_tables must have at least one column, got " + ShapeString(block_tables));
  if (sld.size() != 1 || sld[0] != R)
    return Invalid("seq_lens must be [R] with R = " + std::to_string(R) + ", got " + ShapeString(seq_lens));
  if (qsd.size() != 1 || qsd[0] != R + 1)
    return Invalid("query_start_loc must be [R + 1] with R = " + std::to_string(R) + ", got " +
                   ShapeString(query_start_loc));

  auto od = out.dimensions();
  if (out.element_type() != dt || od.size() != 3 || od[0] != T || od[1] != N || od[2] != H)
    return Invalid("out must match q " + ShapeString(q) + ", got " + ShapeString(out));
  if (num_splits < 1 || num_splits > kMaxSplits)
    return Invalid("num_splits must be in [1, " + std::to_string(kMaxSplits) + "], got " +
                   std::to_string(num_splits));
  auto wd = workspace.dimensions();
  const int64_t need = WorkspaceElements(num_splits, T, N, H);
  if (workspace.element_type() != ffi::DataType::F32 || wd.size() != 1 || wd[0] < need)
    return Invalid("workspace must be f32[>= " + std::to_string(need) + "] for num_splits=" +
                   std::to_string(num_splits) + ", got " + ShapeString(workspace));
  for (const auto* b : {&k_scale, &v_scale}) {
    auto d = b->dimensions();
    if (b->element_type() != ffi::DataType::F32 || d.size() != 1 || d[0] != K)
      return Invalid("k_scale and v_scale must be f32[K] with K = " + std::to_string(K) + " kv heads, got " +
                     ShapeString(*b));
  }
  if (sliding_window < 0)
    return Invalid("sliding_window must be >= 0 (0: none), got " + std::to_string(sliding_window));
  if (!std::isfinite(logit_softcap) || logit_softcap < 0.f)
    return Invalid("logit_softcap must be finite and >= 0 (0: none), got " + std::to_string(logit_softcap));
  if (kernel < 0 || kernel > 4)
    return Invalid("kernel must be 0 (auto), 1 (simt), 2 (tensor core), 3 (invariant) or 4 (invariant16), got " +
                   std::to_string(kernel));
  const bool invariant = kernel == static_cast<int32_t>(KernelChoice::kInvariant) ||
                         kernel == static_cast<int32_t>(KernelChoice::kInvariant16);
  if (split_size < 0 || split_size % kSplitGranule != 0)
    return Invalid("split_size must be 0 or a positive multiple of " + std::to_string(kSplitGranule) + ", got " +
                   std::to_string(split_size));
  if (split_size > 0 && !invariant)
    return Invalid("split_size is for kernels 3 and 4 (invariant), got kernel " + std::to_string(kernel));
  if (invariant && split_size == 0 && num_splits != 1)
    return Invalid("kernel " + std::to_string(kernel) + " (invariant) without a split_size runs unsplit: "
                   "num_splits must be 1, got " + std::to_string(num_splits));
  // Every count the kernels index with must fit int32 (offsets are computed in int64).
  const int64_t kIntMax = 2147483647;
  if (T > kIntMax / 2 || R > kIntMax / 2 || P > kIntMax || M * page_size > kIntMax / 2)
    return Invalid("sizes exceed int32 indexing");
  if (!(scale == scale)) return Invalid("scale is NaN");

  p->q = q.untyped_data();
  p->k_pages = k_pages.untyped_data();
  p->v_pages = v_pages.untyped_data();
  p->block_tables = static_cast<const int32_t*>(block_tables.untyped_data());
  p->seq_lens = static_cast<const int32_t*>(seq_lens.untyped_data());
  p->query_start_loc = static_cast<const int32_t*>(query_start_loc.untyped_data());
  p->k_scale = static_cast<const float*>(k_scale.untyped_data());
  p->v_scale = static_cast<const float*>(v_scale.untyped_data());
  p->out = out.untyped_data();
  p->workspace = static_cast<float*>(workspace.untyped_data());
  p->q_stride_token = N * H;
  p->q_stride_head = H;
  p->kv_stride_page = page_size * K * H;
  p->kv_stride_token = K * H;
  p->kv_stride_head = H;
  p->out_stride_token = N * H;
  p->out_stride_head = H;
  p->bt_stride = M;
  p->num_tokens = static_cast<int>(T);
  p->num_heads = static_cast<int>(N);
  p->num_kv_heads = static_cast<int>(K);
  p->head_dim = static_cast<int>(H);
  p->num_pages = static_cast<int>(P);
  p->page_size = static_cast<int>(page_size);
  p->num_requests = static_cast<int>(R);
  p->max_pages = static_cast<int>(M);
  p->num_splits = num_splits;
  p->split_size = split_size;
  p->scale = scale;
  p->sliding_window = sliding_window;
  p->logit_softcap = logit_softcap;
  p->dtype = dtype;
  p->kv_dtype = kv_dt == ffi::DataType::F8E4M3FN ? KvDType::kFp8E4M3 : KvDType::kSameAsQ;
  return ffi::Error::Success();
}

}  // namespace pagedjax
