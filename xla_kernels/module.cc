// The pagedjax._kernels extension: hands Python the XLA FFI handlers as
// capsules, by target name and platform (pagedjax/_ffi.py registers them), and
// the head-dim tables of paged_attention.h, so Python never restates them.
#include <pybind11/pybind11.h>

#include "paged_attention.h"

#include "xla/ffi/api/c_api.h"

namespace py = pybind11;

extern "C" {
XLA_FFI_Error* PagedjaxKvWriteCpu(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* PagedjaxPagedAttentionCpu(XLA_FFI_CallFrame* call_frame);
#ifdef PAGEDJAX_WITH_CUDA
XLA_FFI_Error* PagedjaxKvWriteCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* PagedjaxPagedAttentionCuda(XLA_FFI_CallFrame* call_frame);
#endif
// Quantized matmuls (CUDA only: on other platforms the XLA path of pagedjax.quantization runs).
#ifdef PAGEDJAX_WITH_CUDA
XLA_FFI_Error* PagedjaxInt4GemmCuda(XLA_FFI_CallFrame* call_frame);
#endif
#if defined(PAGEDJAX_WITH_CUDA) && defined(PAGEDJAX_WITH_CUBLASLT)
XLA_FFI_Error* PagedjaxFp8GemmCuda(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* PagedjaxInvariantGemmCuda(XLA_FFI_CallFrame* call_frame);
#endif
}

namespace {

py::capsule Capsule(XLA_FFI_Error* (*fn)(XLA_FFI_CallFrame*)) {
  return py::capsule(reinterpret_cast<void*>(fn));
}

// {platform: {target name: handler capsule}}
py::dict Registrations() {
  py::dict cpu;
  cpu["pagedjax_kv_write"] = Capsule(PagedjaxKvWriteCpu);
  cpu["pagedjax_paged_attention"] = Capsule(PagedjaxPagedAttentionCpu);
  py::dict out;
  out["cpu"] = cpu;
#ifdef PAGEDJAX_WITH_CUDA
  py::dict cuda;
  cuda["pagedjax_kv_write"] = Capsule(PagedjaxKvWriteCuda);
  cuda["pagedjax_paged_attention"] = Capsule(PagedjaxPagedAttentionCuda);
  out["CUDA"] = cuda;
#endif
  // Quantized matmuls.
#ifdef PAGEDJAX_WITH_CUDA
  cuda["pagedjax_int4_gemm"] = Capsule(PagedjaxInt4GemmCuda);
#endif
#if defined(PAGEDJAX_WITH_CUDA) && defined(PAGEDJAX_WITH_CUBLASLT)
  cuda["pagedjax_fp8_gemm"] = Capsule(PagedjaxFp8GemmCuda);
  // The batch-invariant GEMM (cuBLASLt, one algorithm per shape of the weight).
  cuda["pagedjax_invariant_gemm"] = Capsule(PagedjaxInvariantGemmCuda);
#endif
  return out;
}

template <size_t N>
py::tuple Table(const int (&dims)[N]) {
  py::tuple t(N);
  for (size_t i = 0; i < N; ++i) t[i] = dims[i];
  return t;
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "pagedjax XLA FFI handlers (CPU always; CUDA when built with a CUDA toolkit)";
  m.def("registrations", &Registrations,
        "{platform: {target name: capsule}} for jax.ffi.register_ffi_target");
  m.def("head_dims", [] { return Table(pagedjax::kSupportedHeadDims); },
        "head dims every paged-attention handler is compiled for");
  m.def("tensor_core_head_dims", [] { return Table(pagedjax::kTensorCoreHeadDims); },
        "head dims of the CUDA tensor-core kernels (bf16/f16 queries), also in a CPU-only build");
#ifdef PAGEDJAX_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
