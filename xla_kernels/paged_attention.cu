// PagedAttention over a ragged batch: the CUDA handler (FFI target "pagedjax_paged_attention",
// platform CUDA): checks, kernel choice, launches. Dims and the metadata contract:
// paged_attention.h; the kernels: paged_attention_{common,simt,tc}.cuh.
//
// Every launch shape depends only on static shapes and attributes (CUDA-graph safe):
//  - TensorCoreKernel<T, Kv, H, WM> (bf16/f16 q; the pool in q's dtype or fp8): one CTA of 4
//    warps per (query tile, kv head, split); WM=1 tiles (16 rows) for requests of few query
//    tokens, WM=4 tiles (64 rows) for the rest.
//  - SimtKernel<T, Kv, H> (any q dtype incl. f32; also the fallback): one CTA per (token, kv head,
//    head chunk, split).
//  - kernel "invariant" (batch_invariant): TensorCoreKernel<T, Kv, H, 4> alone, for every request,
//    its K/V tiles 64-aligned, unsplit (SIMT where no tensor-core kernel applies); "invariant16":
//    TensorCoreKernel<T, Kv, H, 1> the same way. With a fixed split_size: TensorCoreKernel<..., true>,
//    one CTA per split (S > 1) or one CTA folding every split in turn (S == 1); SIMT refused.
//  - MergeSplitsKernel<T>: split-KV (flash-decoding) partials (o, lse) -> out, when S > 1 (the
//    fold in split order under a fixed split_size).
// Query tiles map to CTAs without reading lengths on the host: a grid of T / BQ + R + 1 slots,
// slot w serving request r = max{r : query_start_loc[r] / BQ + r <= w} (searched by a warp), tile
// w - key(r) of it; slots past the last request zero the padding tokens.
// Metadata out of range (a page id outside [0, P), seq_len beyond the block table, q_len >
// seq_len, a bad query_start_loc) never reads out of bounds: that request's rows become NaN.
// The scales are not checked here (device data): they must be finite and positive.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "paged_attention.h"
#include "paged_attention_common.cuh"
#include "paged_attention_simt.cuh"
#include "paged_attention_tc.cuh"
#include "xla/ffi/api/ffi.h"

namespace pagedjax {
namespace {

namespace ffi = xla::ffi;
using kernels::Fp8;
using kernels::kThreads;
using kernels::Params;
using kernels::TileArgs;

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

ffi::Error CheckGrid(int64_t x, int64_t y) {
  if (x > INT_MAX) return detail::Invalid("too many query tiles for one grid (" + std::to_string(x) + ")");
  if (y > 65535) return detail::Invalid("too many kv heads x head chunks for one grid (" + std::to_string(y) + ")");
  return ffi::Error::Success();
}

template <typename T, typename Kv, int H>
ffi::Error LaunchSimt(cudaStream_t stream, const Params& p) {
  const int G = p.num_heads / p.num_kv_heads, chunks = (G + 7) / 8;
  if (ffi::Error e = CheckGrid(p.num_tokens, static_cast<int64_t>(p.num_kv_heads) * chunks); e.failure()) return e;
  dim3 grid(p.num_tokens, p.num_kv_heads * chunks, p.num_splits);
  kernels::SimtKernel<T, Kv, H><<<grid, kThreads, 0, stream>>>(p, chunks);
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
  a.align_start = false;
  return a;
}

template <typename T, typename Kv, int H, int WM, bool kFixed = false>
ffi::Error LaunchTile(cudaStream_t stream, const Params& p, const TileArgs& a) {
  static std::atomic<bool> smem_done[64];
  auto kernel = kernels::TensorCoreKernel<T, Kv, H, WM, kFixed>;
  // The fold (a fixed split size walked by one CTA, num_splits == 1) keeps its accumulators past
  // the stages; a launch of one CTA per split does not fold, so it asks only for the stages. The
  // limit is raised once, to the larger size, whichever launch comes first.
  const int stages = kernels::TcShape<Kv, H>::kSmemBytes;
  const int most = stages + (kFixed ? kernels::FoldSmemBytes<H, WM>() : 0);
  const int bytes = kFixed && p.num_splits == 1 ? most : stages;
  if (ffi::Error e = AllowSmem(kernel, most, smem_done); e.failure()) return e;
  const int64_t slots = static_cast<int64_t>(p.num_tokens) / a.tile_q + p.num_requests + 1;
  if (ffi::Error e = CheckGrid(slots, static_cast<int64_t>(p.num_kv_heads) * a.head_chunks); e.failure()) return e;
  dim3 grid(static_cast<unsigned>(slots), p.num_kv_heads * a.head_chunks, p.num_splits);
  kernel<<<grid, kThreads, bytes, stream>>>(p, a);
  return CheckLaunch(WM == 1 ? "TensorCoreKernel (decode)" : "TensorCoreKernel (prefill)");
}

// Decode-style tiles (16 rows, warps split K/V) for requests of few query tokens, prefill-style
// tiles (64 rows) for the rest; a batch that cannot hold a longer request (T <= R, the decode
// buckets) launches only the first, which is correct for any q_len.
template <typename T, typename Kv, int H>
ffi::Error LaunchTensorCore(cudaStream_t stream, const Params& p) {
  const int G = p.num_heads / p.num_kv_heads;
  TileArgs dec = MakeTileArgs(G, 16), pre = MakeTileArgs(G, 64);
  const bool both = p.num_tokens > p.num_requests && p.num_tokens > dec.tile_q;
  dec.zero_padding = true;
  if (both) {
    dec.max_q_len = dec.tile_q;
    pre.min_q_len = dec.tile_q + 1;
  }
  if (ffi::Error e = LaunchTile<T, Kv, H, 1>(stream, p, dec); e.failure()) return e;
  if (both)
    if (ffi::Error e = LaunchTile<T, Kv, H, 4>(stream, p, pre); e.failure()) return e;
  return ffi::Error::Success();
}

// batch_invariant: one launch of 16*WM-row tiles for every request, decodes and prefills alike, its
// K/V tiles at multiples of 64 positions (unsplit). A row's arithmetic then depends only on its own
// query, position and window, and steps it does not see leave it unchanged:
//  - WM=4 (kernel "invariant"): the row's warp walks every 16-position step in order, whether the
//    tile holds one token or 16 of a prefill chunk;
//  - WM=1 ("invariant16"): the four warps split each K/V tile by its 16-position steps, so a
//    position's step always goes to the same warp (by its offset in the 64-aligned tile), each warp
//    walks its steps in order, and the warps merge in one order. A decode's steps then run on four
//    warps, where WM=4 computes them all on one.
// With a fixed split size (p.split_size > 0) the same tiles cut each context at multiples of it:
// one CTA per split and the merge's fold (num_splits > 1), or one CTA walking and folding them all.
template <typename T, typename Kv, int H, int WM>
ffi::Error LaunchTensorCoreInvariant(cudaStream_t stream, const Params& p) {
  TileArgs a = MakeTileArgs(p.num_heads / p.num_kv_heads, 16 * WM);
  a.zero_padding = true;
  a.align_start = true;
  if (p.split_size > 0) return LaunchTile<T, Kv, H, WM, true>(stream, p, a);
  return LaunchTile<T, Kv, H, WM>(stream, p, a);
}

enum class Family { kSimt, kTensorCore, kInvariant, kInvariant16 };

template <typename T, typename Kv, int H>
ffi::Error LaunchHeadDim(cudaStream_t stream, const Params& p, Family family) {
  if constexpr (!std::is_same_v<T, float> && H % 16 == 0 && H >= 64) {
    if (family == Family::kTensorCore) return LaunchTensorCore<T, Kv, H>(stream, p);
    if (family == Family::kInvariant) return LaunchTensorCoreInvariant<T, Kv, H, 4>(stream, p);
    if (family == Family::kInvariant16) return LaunchTensorCoreInvariant<T, Kv, H, 1>(stream, p);
  }
  return LaunchSimt<T, Kv, H>(stream, p);
}

// One case per entry of kSupportedHeadDims; tensor cores only where kTensorCoreHeadDims has it.
template <typename T, typename Kv>
ffi::Error LaunchAttention(cudaStream_t stream, const Params& p, Family f) {
  switch (p.head_dim) {
    case 16: return LaunchHeadDim<T, Kv, 16>(stream, p, Family::kSimt);
    case 32: return LaunchHeadDim<T, Kv, 32>(stream, p, Family::kSimt);
    case 64: return LaunchHeadDim<T, Kv, 64>(stream, p, f);
    case 80: return LaunchHeadDim<T, Kv, 80>(stream, p, f);
    case 96: return LaunchHeadDim<T, Kv, 96>(stream, p, f);
    case 128: return LaunchHeadDim<T, Kv, 128>(stream, p, f);
    case 256: return LaunchHeadDim<T, Kv, 256>(stream, p, f);
    default:
      return detail::Invalid("no CUDA kernel compiled for head dim " + std::to_string(p.head_dim));
  }
}

template <typename T>
ffi::Error Run(cudaStream_t stream, const Params& p, Family f) {
  ffi::Error e = p.kv_dtype == KvDType::kFp8E4M3 ? LaunchAttention<T, Fp8>(stream, p, f)
                                                 : LaunchAttention<T, T>(stream, p, f);
  if (e.failure()) return e;
  if (p.num_splits > 1) {
    dim3 grid(p.num_tokens, (p.num_heads + kThreads / 32 - 1) / (kThreads / 32));
    kernels::MergeSplitsKernel<T><<<grid, kThreads, 0, stream>>>(p);
    if (ffi::Error e = CheckLaunch("MergeSplitsKernel"); e.failure()) return e;
  }
  return ffi::Error::Success();
}

ffi::Error PagedAttentionCuda(cudaStream_t stream,
                              ffi::AnyBuffer q,                // [T, N, H] f32 | f16 | bf16
                              ffi::AnyBuffer k_pages,          // [P, page_size, K, H], q's dtype or f8e4m3fn
                              ffi::AnyBuffer v_pages,          // [P, page_size, K, H], k_pages' dtype
                              ffi::AnyBuffer block_tables,     // s32 [R, M]
                              ffi::AnyBuffer seq_lens,         // s32 [R]
                              ffi::AnyBuffer query_start_loc,  // s32 [R + 1]
                              ffi::AnyBuffer k_scale,          // f32 [K] (ones unless the pool is fp8)
                              ffi::AnyBuffer v_scale,          // f32 [K]
                              float scale,                     // softmax scale
                              int32_t num_splits,              // split-KV partitions S (static)
                              int32_t split_size,              // fixed split size (0: S equal parts)
                              int32_t kernel,                  // KernelChoice
                              int32_t sliding_window,          // W (0: none)
                              float logit_softcap,             // c (0: none)
                              ffi::Result<ffi::AnyBuffer> out,         // [T, N, H], q's dtype
                              ffi::Result<ffi::AnyBuffer> workspace) {  // f32 [>= S*T*N*(H+1)] if S > 1
  Params p;
  if (ffi::Error e = MakePagedAttentionParams(q, k_pages, v_pages, block_tables, seq_lens, query_start_loc,
                                              k_scale, v_scale, scale, num_splits, split_size, kernel, sliding_window,
                                              logit_softcap, *out, *workspace, &p);
      e.failure())
    return e;
  if (p.num_tokens == 0) return ffi::Error::Success();
  const bool tc_available =
      p.dtype != DType::kF32 && HasTensorCoreKernel(p.head_dim, p.kv_dtype == KvDType::kFp8E4M3);
  Family family = tc_available ? Family::kTensorCore : Family::kSimt;
  switch (static_cast<KernelChoice>(kernel)) {
    case KernelChoice::kAuto: break;
    case KernelChoice::kSimt: family = Family::kSimt; break;
    case KernelChoice::kInvariant: family = tc_available ? Family::kInvariant : Family::kSimt; break;
    case KernelChoice::kInvariant16: family = tc_available ? Family::kInvariant16 : Family::kSimt; break;
    case KernelChoice::kTensorCore:
      if (!tc_available)
        return detail::Invalid("no tensor-core kernel for " + detail::ShapeString(q) + " (bf16/f16 with head dim " +
                               detail::JoinDims(kTensorCoreHeadDims) + ")");
      break;
  }
  if (p.split_size > 0 && (p.dtype == DType::kF32 || family == Family::kSimt))
    return detail::Invalid("split_size runs on the tensor-core kernels only (bf16/f16 with head dim " +
                           detail::JoinDims(kTensorCoreHeadDims) + "), not for " + detail::ShapeString(q) + " over " +
                           detail::ShapeString(k_pages));
  switch (p.dtype) {
    case DType::kF32: return Run<float>(stream, p, Family::kSimt);
    case DType::kF16: return Run<__half>(stream, p, family);
    case DType::kBF16: return Run<__nv_bfloat16>(stream, p, family);
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
                                  .Arg<xla::ffi::AnyBuffer>()  // k_scale
                                  .Arg<xla::ffi::AnyBuffer>()  // v_scale
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("num_splits")
                                  .Attr<int32_t>("split_size")
                                  .Attr<int32_t>("kernel")
                                  .Attr<int32_t>("sliding_window")
                                  .Attr<float>("logit_softcap")
                                  .Ret<xla::ffi::AnyBuffer>()   // out
                                  .Ret<xla::ffi::AnyBuffer>(),  // workspace
                              {xla::ffi::Traits::kCmdBufferCompatible});
