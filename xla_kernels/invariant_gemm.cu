// The batch-invariant GEMM, CUDA handler: y [M, N] = x [M, K] @ w [K, N] through cuBLASLt with
// one algorithm per (N, K, types), whatever M is.
//
// Dims: M rows of x (tokens), K contracted, N output features.
//
// cuBLAS picks its kernel, tile and split-K by the problem's shape, so a row's sums change order
// with the number of rows beside it. Here the algorithm is fixed once per (device, N, K, input
// type, output type, reference rows R): the heuristic's first choice for an R-row problem, with its
// split-K count set to 1 and no reduction scheme, so every output element is one CTA's sum over K
// in its kernel's fixed order. Every later call of that (N, K), at any M, runs that algorithm
// (cublasLtMatmulAlgoCheck validates it for each new M; a refusal is an error, never a quiet other
// algorithm). Row m of y then depends on row m of x and on w alone.
//
// Row-major x [M, K] is cuBLASLt's column-major K x M, w [K, N] its N x K, y [M, N] its N x M:
// D (N x M) = A (N x K, w) @ B (K x M, x), neither transposed. Accumulation is f32
// (CUBLAS_COMPUTE_32F). The workspace is the call's second output.
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "lt_loader.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pagedjax {
namespace {

using lt::CublasLt;
using lt::Lt;
using lt::Owned;
using GemmWorkspace = ffi::Buffer<ffi::U8, 1>;

#define PAGEDJAX_LT_CHECK(expr)                                                                             \
  do {                                                                                                      \
    cublasStatus_t _st = (expr);                                                                            \
    if (_st != CUBLAS_STATUS_SUCCESS) {                                                                     \
      return ffi::Error::Internal(std::string("pagedjax_invariant_gemm: ") + #expr + ": " + lt.status_string(_st)); \
    }                                                                                                       \
  } while (0)

std::mutex g_mu;
// device, N, K, input type, output type, reference rows -> the algorithm
using AlgoKey = std::tuple<int, int64_t, int64_t, int, int, int32_t>;
std::map<AlgoKey, cublasLtMatmulAlgo_t> g_algos;
// (AlgoKey, M) checked: the workspace the algorithm needs at that M
std::map<std::tuple<AlgoKey, int64_t>, size_t> g_checked;

std::string Dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error InvariantGemmCuda(cudaStream_t stream,
                             ffi::AnyBuffer x,                       // [M, K] bf16 / f16
                             ffi::AnyBuffer w,                       // [K, N] x's type
                             ffi::Result<ffi::AnyBuffer> out,        // [M, N] x's type or f32
                             ffi::Result<GemmWorkspace> workspace,   // cuBLASLt scratch
                             int32_t reference_rows) {
  auto bad = [](const std::string& msg) { return ffi::Error::InvalidArgument("pagedjax_invariant_gemm: " + msg); };
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2) return bad("x " + Dims(xd) + " and w " + Dims(wd) + " must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (wd[0] != K) return bad("x " + Dims(xd) + " and w " + Dims(wd) + " differ in K");
  if (od.size() != 2 || od[0] != M || od[1] != N) return bad("out " + Dims(od) + " must be [M, N]");
  if (x.element_type() != w.element_type()) return bad("x and w must have one type");
  cudaDataType_t in_type, out_type;
  switch (x.element_type()) {
    case ffi::DataType::BF16: in_type = CUDA_R_16BF; break;
    case ffi::DataType::F16: in_type = CUDA_R_16F; break;
    default: return bad("x and w must be bf16 or f16");
  }
  if (out->element_type() == ffi::DataType::F32) {
    out_type = CUDA_R_32F;
  } else if (out->element_type() == x.element_type()) {
    out_type = in_type;
  } else {
    return bad("out must have x's type or be f32");
  }
  if (K % 8 != 0 || N % 8 != 0) return bad("K and N must be multiples of 8 (16-byte rows)");
  if (reference_rows < 1) return bad("reference_rows must be positive");
  if (M == 0 || N == 0) return ffi::Error::Success();

  const CublasLt& lt = Lt();
  if (!lt.error.empty()) return ffi::Error::Internal("pagedjax_invariant_gemm: " + lt.error);
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) {
    return ffi::Error::Internal(std::string("pagedjax_invariant_gemm: cudaGetDevice: ") + cudaGetErrorString(e));
  }
  cublasLtHandle_t handle = nullptr;
  PAGEDJAX_LT_CHECK(lt::DeviceHandle(lt, device, &handle));

  using Desc = Owned<cublasLtMatmulDesc_t, decltype(lt.desc_destroy)>;
  using Layout = Owned<cublasLtMatrixLayout_t, decltype(lt.layout_destroy)>;
  Desc desc{nullptr, lt.desc_destroy};
  PAGEDJAX_LT_CHECK(lt.desc_create(&desc.value, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_n = CUBLAS_OP_N;
  PAGEDJAX_LT_CHECK(lt.desc_set(desc.value, CUBLASLT_MATMUL_DESC_TRANSA, &op_n, sizeof(op_n)));
  PAGEDJAX_LT_CHECK(lt.desc_set(desc.value, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
  // Layouts of an m-row problem: A = w (N x K, ld N), B = x (K x m, ld K), D = y (N x m, ld N).
  auto layouts = [&](int64_t m, Layout* a, Layout* b, Layout* d) -> ffi::Error {
    PAGEDJAX_LT_CHECK(lt.layout_create(&a->value, in_type, N, K, N));
    PAGEDJAX_LT_CHECK(lt.layout_create(&b->value, in_type, K, m, K));
    PAGEDJAX_LT_CHECK(lt.layout_create(&d->value, out_type, N, m, N));
    return ffi::Error::Success();
  };
  const size_t ws_bytes = workspace->element_count();
  const AlgoKey key{device, N, K, static_cast<int>(in_type), static_cast<int>(out_type), reference_rows};

  cublasLtMatmulAlgo_t algo;
  bool have = false;
  size_t need = 0;
  bool checked = false;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (auto it = g_algos.find(key); it != g_algos.end()) {
      algo = it->second;
      have = true;
    }
    if (auto it = g_checked.find({key, M}); it != g_checked.end()) {
      need = it->second;
      checked = true;
    }
  }
  if (!have) {  // the heuristic's first choice at the reference rows, unsplit
    Layout a{nullptr, lt.layout_destroy}, b{nullptr, lt.layout_destroy}, d{nullptr, lt.layout_destroy};
    if (ffi::Error e = layouts(reference_rows, &a, &b, &d); e.failure()) return e;
    Owned<cublasLtMatmulPreference_t, decltype(lt.pref_destroy)> pref{nullptr, lt.pref_destroy};
    PAGEDJAX_LT_CHECK(lt.pref_create(&pref.value));
    PAGEDJAX_LT_CHECK(lt.pref_set(pref.value, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)));
    cublasLtMatmulHeuristicResult_t result = {};
    int n = 0;
    PAGEDJAX_LT_CHECK(lt.heuristic(handle, desc.value, a.value, b.value, d.value, d.value, pref.value, 1, &result, &n));
    if (n < 1) {
      return ffi::Error::Internal("pagedjax_invariant_gemm: cuBLASLt has no algorithm for N=" + std::to_string(N) +
                                  " K=" + std::to_string(K));
    }
    algo = result.algo;
    const uint32_t one = 1;
    const uint32_t none = CUBLASLT_REDUCTION_SCHEME_NONE;
    PAGEDJAX_LT_CHECK(lt.algo_config_set(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &one, sizeof(one)));
    PAGEDJAX_LT_CHECK(lt.algo_config_set(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &none, sizeof(none)));
    std::lock_guard<std::mutex> lock(g_mu);
    g_algos.emplace(key, algo);
  }

  Layout a{nullptr, lt.layout_destroy}, b{nullptr, lt.layout_destroy}, d{nullptr, lt.layout_destroy};
  if (ffi::Error e = layouts(M, &a, &b, &d); e.failure()) return e;
  if (!checked) {
    cublasLtMatmulHeuristicResult_t result = {};
    const cublasStatus_t st = lt.algo_check(handle, desc.value, a.value, b.value, d.value, d.value, &algo, &result);
    if (st != CUBLAS_STATUS_SUCCESS) {
      return ffi::Error::Internal("pagedjax_invariant_gemm: the fixed algorithm of N=" + std::to_string(N) + " K=" +
                                  std::to_string(K) + " does not run M=" + std::to_string(M) + ": " +
                                  lt.status_string(st));
    }
    need = result.workspaceSize;
    std::lock_guard<std::mutex> lock(g_mu);
    g_checked.emplace(std::make_tuple(key, M), need);
  }
  if (need > ws_bytes) {
    return ffi::Error::Internal("pagedjax_invariant_gemm: the fixed algorithm needs " + std::to_string(need) +
                                " workspace bytes at M=" + std::to_string(M) + ", the call has " +
                                std::to_string(ws_bytes));
  }
  const float alpha = 1.f, beta = 0.f;
  void* y = out->untyped_data();
  PAGEDJAX_LT_CHECK(lt.matmul(handle, desc.value, &alpha, w.untyped_data(), a.value, x.untyped_data(), b.value,
                              &beta, y, d.value, y, d.value, &algo, workspace->typed_data(), ws_bytes, stream));
  return ffi::Error::Success();
}

#undef PAGEDJAX_LT_CHECK

}  // namespace
}  // namespace pagedjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxInvariantGemmCuda, pagedjax::InvariantGemmCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()                  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()                  // w [K, N]
                                  .Ret<ffi::AnyBuffer>()                  // y [M, N]
                                  .Ret<pagedjax::GemmWorkspace>()         // workspace
                                  .Attr<int32_t>("reference_rows"),
                              {ffi::Traits::kCmdBufferCompatible});
