// FP8 W8A8 GEMM through cuBLASLt, CUDA handler: y [M, N] = (x_q * x_scale) @ (w_q * w_scale)^T.
//
// Dims: M rows of x, K in_features, N out_features, KB = ceil(K / 128), NB = ceil(N / 128),
// KBp = KB rounded up to a multiple of 4.
//
// cuBLASLt is column-major and its FP8 kernels want both operands K-contiguous ("TN"): with
// A = w_q ([N, K] row-major = K x N column-major, op T) and B = x_q ([M, K] row-major = K x M,
// op N), D = op(A) op(B) is N x M column-major, i.e. y [M, N] row-major. Accumulation is f32
// (CUBLAS_COMPUTE_32F, fast accumulation off); the scales are applied by cuBLASLt itself:
//   scale_mode 0  scalar x scalar           (A, B: CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F)
//   scale_mode 1  per-row of w x per-row of x  (OUTER_VEC_32F: w_scale [N], x_scale [M])
//   scale_mode 2  128x128 blocks of w x 1x128 groups of x (BLK128x128_32F: w_scale [NB, KBp],
//                 K-blocks fastest; VEC128_32F: x_scale [KB, M], M fastest)
// Modes 1 and 2 need cuBLASLt >= 12.9 on sm_90. Should cuBLASLt offer no algorithm for mode 1
// (a shape it does not cover), the GEMM runs with unit scales into y and a small kernel applies
// x_scale[m] * w_scale[n] in place (bf16 and f32 outputs; f16 could overflow unscaled).
//
// libcublasLt.so.13 is opened with dlopen when first needed (lt_loader.h), so the extension
// links no cuBLAS. Handles are per device; heuristic
// choices are cached per problem. The workspace is the call's second output.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

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

using Fp8Workspace = ffi::Buffer<ffi::U8, 1>;

using lt::CublasLt;
using lt::Lt;
using lt::Owned;

#define PAGEDJAX_LT_CHECK(expr)                                                                        \
  do {                                                                                                  \
    cublasStatus_t _st = (expr);                                                                        \
    if (_st != CUBLAS_STATUS_SUCCESS) {                                                                 \
      return ffi::Error::Internal(std::string("pagedjax_fp8_gemm: ") + #expr + ": " + lt.status_string(_st)); \
    }                                                                                                   \
  } while (0)

// Per-problem algorithm, guarded by one mutex (host-side, cheap).
std::mutex g_mu;
using AlgoKey = std::tuple<int, int64_t, int64_t, int64_t, int, int>;  // device, M, N, K, out type, mode
struct Choice {
  cublasLtMatmulAlgo_t algo;
  bool unit_scales;  // mode 1 had no algorithm: unit-scale GEMM, then OuterScaleKernel
};
std::map<AlgoKey, Choice> g_algos;

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void Store(float* p, float v) { *p = v; }
__device__ __forceinline__ void Store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// y[m, n] *= x_scale[m] * w_scale[n], in place ([M, N] row-major).
template <typename T>
__global__ void OuterScaleKernel(T* __restrict__ y, const float* __restrict__ xs, const float* __restrict__ ws,
                                 int64_t M, int64_t N) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < M * N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Store(y + i, ToFloat(y[i]) * xs[i / N] * ws[i % N]);
  }
}

// A matmul descriptor for the TN FP8 GEMM with these scale modes and (device) scale pointers;
// null pointers leave cuBLASLt's unit scales.
ffi::Error MakeDesc(const CublasLt& lt, int32_t a_mode, int32_t b_mode, const void* a_scale, const void* b_scale,
                    cublasLtMatmulDesc_t* desc) {
  PAGEDJAX_LT_CHECK(lt.desc_create(desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
  PAGEDJAX_LT_CHECK(lt.desc_set(*desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof(op_t)));
  PAGEDJAX_LT_CHECK(lt.desc_set(*desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof(op_n)));
  PAGEDJAX_LT_CHECK(lt.desc_set(*desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof(a_mode)));
  PAGEDJAX_LT_CHECK(lt.desc_set(*desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof(b_mode)));
  if (a_scale != nullptr) {
    PAGEDJAX_LT_CHECK(lt.desc_set(*desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof(a_scale)));
  }
  if (b_scale != nullptr) {
    PAGEDJAX_LT_CHECK(lt.desc_set(*desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof(b_scale)));
  }
  return ffi::Error::Success();
}

std::string Dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error Fp8GemmCuda(cudaStream_t stream,
                       ffi::AnyBuffer x_q,                     // [M, K] e4m3
                       ffi::Buffer<ffi::F32> x_scale,          // [1] | [M] | [KB, M]
                       ffi::AnyBuffer w_q,                     // [N, K] e4m3
                       ffi::Buffer<ffi::F32> w_scale,          // [1] | [N] | [NB, KBp]
                       ffi::Result<ffi::AnyBuffer> out,        // [M, N] bf16 / f16 / f32
                       ffi::Result<Fp8Workspace> workspace,    // cuBLASLt scratch
                       int32_t scale_mode) {
  auto bad = [](const std::string& msg) { return ffi::Error::InvalidArgument("pagedjax_fp8_gemm: " + msg); };
  auto xd = x_q.dimensions(), wd = w_q.dimensions(), od = out->dimensions();
  // (AnyBuffer: the typed FFI buffers have no native type for e4m3.)
  if (x_q.element_type() != ffi::DataType::F8E4M3FN || w_q.element_type() != ffi::DataType::F8E4M3FN) {
    return bad("x_q and w_q must be float8_e4m3fn");
  }
  if (xd.size() != 2 || wd.size() != 2) return bad("x_q " + Dims(xd) + " and w_q " + Dims(wd) + " must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (wd[1] != K) return bad("x_q " + Dims(xd) + " and w_q " + Dims(wd) + " differ in K");
  if (od.size() != 2 || od[0] != M || od[1] != N) return bad("out " + Dims(od) + " must be [M, N]");
  if (K % 16 != 0 || N % 16 != 0) return bad("K and N must be multiples of 16 (FP8 tensor-core alignment)");
  const int64_t KB = (K + 127) / 128, NB = (N + 127) / 128, KBp = (KB + 3) / 4 * 4;
  const int64_t xs = static_cast<int64_t>(x_scale.element_count());
  const int64_t wsz = static_cast<int64_t>(w_scale.element_count());
  cublasLtMatmulMatrixScale_t a_mode, b_mode;
  switch (scale_mode) {
    case 0:
      if (xs != 1 || wsz != 1) return bad("scalar scales must hold one value each");
      a_mode = b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
      break;
    case 1:
      if (xs != M || wsz != N) return bad("outer-vector scales must be x [M] and w [N]");
      a_mode = b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
      break;
    case 2:
      if (xs != KB * M || wsz != NB * KBp) {
        return bad("block scales must be x [KB, M] and w [NB, KBp] with KB = " + std::to_string(KB) +
                   ", KBp = " + std::to_string(KBp));
      }
      a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
      b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
      break;
    default:
      return bad("unknown scale_mode " + std::to_string(scale_mode));
  }
  cudaDataType_t d_type;
  switch (out->element_type()) {
    case ffi::DataType::BF16: d_type = CUDA_R_16BF; break;
    case ffi::DataType::F16: d_type = CUDA_R_16F; break;
    case ffi::DataType::F32: d_type = CUDA_R_32F; break;
    default: return bad("out must be bf16, f16 or f32");
  }
  if (M == 0 || N == 0) return ffi::Error::Success();

  const CublasLt& lt = Lt();
  if (!lt.error.empty()) return ffi::Error::Internal("pagedjax_fp8_gemm: " + lt.error);
  if (lt.get_version() < 120900) {
    return ffi::Error::Internal("pagedjax_fp8_gemm: cuBLASLt " + std::to_string(lt.get_version()) +
                                " is too old: FP8 outer-vector and block scales need 12.9 or newer");
  }
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) {
    return ffi::Error::Internal(std::string("pagedjax_fp8_gemm: cudaGetDevice: ") + cudaGetErrorString(e));
  }
  cublasLtHandle_t handle = nullptr;
  PAGEDJAX_LT_CHECK(lt::DeviceHandle(lt, device, &handle));

  using Desc = Owned<cublasLtMatmulDesc_t, decltype(lt.desc_destroy)>;
  using Layout = Owned<cublasLtMatrixLayout_t, decltype(lt.layout_destroy)>;
  Layout a{nullptr, lt.layout_destroy}, b{nullptr, lt.layout_destroy}, d{nullptr, lt.layout_destroy};
  PAGEDJAX_LT_CHECK(lt.layout_create(&a.value, CUDA_R_8F_E4M3, K, N, K));  // w_q: K x N col-major
  PAGEDJAX_LT_CHECK(lt.layout_create(&b.value, CUDA_R_8F_E4M3, K, M, K));  // x_q: K x M col-major
  PAGEDJAX_LT_CHECK(lt.layout_create(&d.value, d_type, N, M, N));          // y:   N x M col-major
  const size_t ws_bytes = workspace->element_count();
  const void* w_scale_ptr = w_scale.typed_data();
  const void* x_scale_ptr = x_scale.typed_data();

  // The heuristic's first choice for a descriptor; found == false when it has none.
  auto pick = [&](cublasLtMatmulDesc_t desc, cublasLtMatmulAlgo_t* algo, bool* found) -> ffi::Error {
    Owned<cublasLtMatmulPreference_t, decltype(lt.pref_destroy)> pref{nullptr, lt.pref_destroy};
    PAGEDJAX_LT_CHECK(lt.pref_create(&pref.value));
    PAGEDJAX_LT_CHECK(lt.pref_set(pref.value, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)));
    cublasLtMatmulHeuristicResult_t result = {};
    int n = 0;
    const cublasStatus_t st = lt.heuristic(handle, desc, a.value, b.value, d.value, d.value, pref.value, 1, &result, &n);
    *found = st == CUBLAS_STATUS_SUCCESS && n > 0;
    if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED) {
      return ffi::Error::Internal(std::string("pagedjax_fp8_gemm: cublasLtMatmulAlgoGetHeuristic: ") +
                                  lt.status_string(st));
    }
    if (*found) *algo = result.algo;
    return ffi::Error::Success();
  };

  const AlgoKey key{device, M, N, K, static_cast<int>(d_type), scale_mode};
  Choice choice{};
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_algos.find(key);
    if (it != g_algos.end()) {
      choice = it->second;
      cached = true;
    }
  }
  Desc desc{nullptr, lt.desc_destroy};
  if (!cached || !choice.unit_scales) {
    if (ffi::Error e = MakeDesc(lt, a_mode, b_mode, w_scale_ptr, x_scale_ptr, &desc.value); e.failure()) return e;
  }
  if (!cached) {
    bool found = false;
    if (ffi::Error e = pick(desc.value, &choice.algo, &found); e.failure()) return e;
    if (!found && scale_mode == 1 && d_type != CUDA_R_16F) {
      choice.unit_scales = true;
    } else if (!found) {
      return ffi::Error::Internal("pagedjax_fp8_gemm: cuBLASLt has no FP8 algorithm for M=" + std::to_string(M) +
                                  " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                                  " scale_mode=" + std::to_string(scale_mode));
    }
  }
  if (choice.unit_scales) {
    desc.reset();
    const int32_t scalar = CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
    if (ffi::Error e = MakeDesc(lt, scalar, scalar, nullptr, nullptr, &desc.value); e.failure()) return e;
    if (!cached) {
      bool found = false;
      if (ffi::Error e = pick(desc.value, &choice.algo, &found); e.failure()) return e;
      if (!found) {
        return ffi::Error::Internal("pagedjax_fp8_gemm: cuBLASLt has no FP8 algorithm for M=" + std::to_string(M) +
                                    " N=" + std::to_string(N) + " K=" + std::to_string(K) + ", even with unit scales");
      }
    }
  }
  if (!cached) {
    std::lock_guard<std::mutex> lock(g_mu);
    g_algos.emplace(key, choice);
  }

  const float alpha = 1.f, beta = 0.f;
  void* y = out->untyped_data();
  PAGEDJAX_LT_CHECK(lt.matmul(handle, desc.value, &alpha, w_q.untyped_data(), a.value, x_q.untyped_data(), b.value,
                              &beta, y, d.value, y, d.value, &choice.algo, workspace->typed_data(), ws_bytes, stream));
  if (choice.unit_scales) {
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((M * N + threads - 1) / threads, 8192));
    const float* xs_p = x_scale.typed_data();
    const float* ws_p = w_scale.typed_data();
    if (d_type == CUDA_R_32F) {
      OuterScaleKernel<<<blocks, threads, 0, stream>>>(static_cast<float*>(y), xs_p, ws_p, M, N);
    } else {
      OuterScaleKernel<<<blocks, threads, 0, stream>>>(static_cast<__nv_bfloat16*>(y), xs_p, ws_p, M, N);
    }
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) {
      return ffi::Error::Internal(std::string("pagedjax_fp8_gemm: scale kernel: ") + cudaGetErrorString(e));
    }
  }
  return ffi::Error::Success();
}

#undef PAGEDJAX_LT_CHECK

}  // namespace
}  // namespace pagedjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxFp8GemmCuda, pagedjax::Fp8GemmCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()                 // x_q [M, K] e4m3
                                  .Arg<ffi::Buffer<ffi::F32>>()          // x_scale
                                  .Arg<ffi::AnyBuffer>()                 // w_q [N, K] e4m3
                                  .Arg<ffi::Buffer<ffi::F32>>()          // w_scale
                                  .Ret<ffi::AnyBuffer>()                 // y [M, N]
                                  .Ret<pagedjax::Fp8Workspace>()         // workspace
                                  .Attr<int32_t>("scale_mode"),
                              {ffi::Traits::kCmdBufferCompatible});
