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
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace pagedjax {

// Head dims every handler accepts (CPU and CUDA, all dtypes).
inline constexpr int kSupportedHeadDims[] = {16, 32, 64, 80, 96, 128, 256};
// Split-KV partitions start at multiples of this many positions (kernels and merge agree on it).
inline constexpr int kSplitGranule = 64;
inline constexpr int kMaxSplits = 256;

enum class DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };
// The `kernel` attribute: which CUDA kernel family runs (the CPU handler has one).
enum class KernelChoice : int32_t { kAuto = 0, kSimt = 1, kTensorCore = 2 };

// All a kernel sees. Offsets are in elements; every array is row-major as laid out above.
struct PagedAttentionParams {
  const void* q;                   // [T, N, H]
  const void* k_pages;             // [P, page_size, K, H]
  const void* v_pages;             // [P, page_size, K, H]
  const int32_t* block_tables;     // [R, M] page ids
  const int32_t* seq_lens;         // [R]
  const int32_t* query_start_loc;  // [R + 1]
  void* out;                       // [T, N, H], q's dtype
  float* workspace;                // split-KV partials: o [S, T, N, H], then lse (log2) [S, T, N]

  int64_t q_stride_token, q_stride_head;                     // N * H, H
  int64_t kv_stride_page, kv_stride_token, kv_stride_head;   // page_size * K * H, K * H, H
  int64_t out_stride_token, out_stride_head;                 // N * H, H
  int64_t bt_stride;                                         // M

  int num_tokens, num_heads, num_kv_heads, head_dim;
  int num_pages, page_size, num_requests, max_pages;
  int num_splits;
  float scale;  // softmax scale (applied to q.k)
  DType dtype;
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
    default: s = "dtype#" + std::to_string(static_cast<int>(b.element_type())); break;
  }
  s += "[";
  auto dims = b.dimensions();
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
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
    const xla::ffi::AnyBuffer& seq_lens, const xla::ffi::AnyBuffer& query_start_loc, float scale,
    int32_t num_splits, int32_t kernel, xla::ffi::AnyBuffer out, xla::ffi::AnyBuffer workspace,
    PagedAttentionParams* p) {
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
  if (k_pages.element_type() != dt || v_pages.element_type() != dt)
    return Invalid("q, k_pages and v_pages must share a dtype, got q " + ShapeString(q) + ", k_pages " +
                   ShapeString(k_pages) + ", v_pages " + ShapeString(v_pages));
  for (size_t i = 0; i < 4; ++i)
    if (kd[i] != vd[i])
      return Invalid("k_pages and v_pages must have one shape, got " + ShapeString(k_pages) + " and " +
                     ShapeString(v_pages));
  const int64_t T = qd[0], N = qd[1], H = qd[2];
  const int64_t P = kd[0], page_size = kd[1], K = kd[2];
  if (kd[3] != H)
    return Invalid("head dim of q and k_pages differ: " + ShapeString(q) + " vs " + ShapeString(k_pages));
  if (!IsSupportedHeadDim(H)) {
    std::string dims;
    for (int d : kSupportedHeadDims) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
    return Invalid("head dim " + std::to_string(H) + " is not supported (supported: " + dims + ")");
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
  if (kernel < 0 || kernel > 2)
    return Invalid("kernel must be 0 (auto), 1 (simt) or 2 (tensor core), got " + std::to_string(kernel));
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
  p->scale = scale;
  p->dtype = dtype;
  return ffi::Error::Success();
}

}  // namespace pagedjax
