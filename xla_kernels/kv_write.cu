// KV page write, CUDA handler: scatter new K/V rows into the page pool by slot (kv_write.h).
//
// One block per token. A pool in the rows' dtype gets the token's K and V rows (K * H elements
// each, contiguous in the token-major pool) copied with 16-byte vector stores when the row allows
// it. An fp8 pool gets them quantized element by element: the product by the IEEE reciprocal of
// the kv head's scale (__frcp_rn, __fmul_rn: exact under --use_fast_math too), clamp to +-448 with
// NaN kept, then the round-to-nearest-even satfinite conversion: float_convert.h's contract.
// Pools are aliased to the outputs, so the write is in place.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

#include "kv_write.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pagedjax {
namespace {

template <typename Vec>
__global__ void KvWriteKernel(const Vec* __restrict__ k, const Vec* __restrict__ v,
                              const int32_t* __restrict__ slots, Vec* __restrict__ k_pages,
                              Vec* __restrict__ v_pages, int64_t num_slots, int64_t row_vecs) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;  // padding token: dropped
  const Vec* ks = k + t * row_vecs;
  const Vec* vs = v + t * row_vecs;
  Vec* kd = k_pages + slot * row_vecs;
  Vec* vd = v_pages + slot * row_vecs;
  for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) {
    kd[i] = ks[i];
    vd[i] = vs[i];
  }
}

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ __nv_fp8_storage_t QuantizeFp8(float x, float scale) {
  float y = __fmul_rn(x, __frcp_rn(scale));
  if (!isnan(y)) y = fminf(fmaxf(y, -448.f), 448.f);  // fminf/fmaxf would turn NaN into a bound
  return __nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3);
}

template <typename T>
__global__ void KvWriteFp8Kernel(const T* __restrict__ k, const T* __restrict__ v,
                                 const int32_t* __restrict__ slots, const float* __restrict__ k_scale,
                                 const float* __restrict__ v_scale, __nv_fp8_storage_t* __restrict__ k_pages,
                                 __nv_fp8_storage_t* __restrict__ v_pages, int64_t num_slots, int head_dim,
                                 int64_t row_elems) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;  // padding token: dropped
  for (int64_t i = threadIdx.x; i < row_elems; i += blockDim.x) {
    const int kh = static_cast<int>(i / head_dim);
    k_pages[slot * row_elems + i] = QuantizeFp8(ToFloat(k[t * row_elems + i]), __ldg(k_scale + kh));
    v_pages[slot * row_elems + i] = QuantizeFp8(ToFloat(v[t * row_elems + i]), __ldg(v_scale + kh));
  }
}

template <typename Vec>
cudaError_t Launch(cudaStream_t stream, const void* k, const void* v, const int32_t* slots,
                   void* k_pages, void* v_pages, const KvWriteShape& s) {
  const int64_t row_vecs = s.row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int threads = static_cast<int>(row_vecs < 128 ? (row_vecs < 32 ? 32 : row_vecs) : 128);
  KvWriteKernel<Vec><<<static_cast<unsigned>(s.num_tokens), threads, 0, stream>>>(
      static_cast<const Vec*>(k), static_cast<const Vec*>(v), slots, static_cast<Vec*>(k_pages),
      static_cast<Vec*>(v_pages), s.num_slots, row_vecs);
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchFp8(cudaStream_t stream, const void* k, const void* v, const int32_t* slots,
                      const void* k_scale, const void* v_scale, void* k_pages, void* v_pages,
                      const KvWriteShape& s) {
  const int64_t row_elems = s.num_kv_heads * s.head_dim;
  const int threads = row_elems >= 256 ? 256 : (row_elems < 32 ? 32 : static_cast<int>(row_elems));
  KvWriteFp8Kernel<T><<<static_cast<unsigned>(s.num_tokens), threads, 0, stream>>>(
      static_cast<const T*>(k), static_cast<const T*>(v), slots, static_cast<const float*>(k_scale),
      static_cast<const float*>(v_scale), static_cast<__nv_fp8_storage_t*>(k_pages),
      static_cast<__nv_fp8_storage_t*>(v_pages), s.num_slots, static_cast<int>(s.head_dim), row_elems);
  return cudaGetLastError();
}

bool Aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

ffi::Error KvWriteCudaImpl(cudaStream_t stream,
                           ffi::AnyBuffer k_pages,                 // [P, page, K, H]
                           ffi::AnyBuffer v_pages,                 // [P, page, K, H]
                           ffi::AnyBuffer k,                       // [T, K, H]
                           ffi::AnyBuffer v,                       // [T, K, H]
                           ffi::Buffer<ffi::S32, 1> slot_mapping,  // [T]
                           ffi::AnyBuffer k_scale,                 // f32 [K] (fp8 pools only)
                           ffi::AnyBuffer v_scale,                 // f32 [K]
                           ffi::Result<ffi::AnyBuffer> k_out,      // aliases k_pages
                           ffi::Result<ffi::AnyBuffer> v_out) {    // aliases v_pages
  KvWriteShape s{};
  if (ffi::Error err = CheckKvWrite(k_pages, v_pages, k, v, slot_mapping, k_scale, v_scale, &s);
      err.failure()) {
    return err;
  }
  void* kd = k_out->untyped_data();
  void* vd = v_out->untyped_data();
  const size_t pool_bytes = static_cast<size_t>(s.num_slots * s.row_bytes);
  // XLA aliases the pools; if it ever did not, start from the input pool.
  for (auto [dst, src] : {std::pair<void*, const void*>{kd, k_pages.untyped_data()}, {vd, v_pages.untyped_data()}}) {
    if (dst == src) continue;
    if (cudaError_t err = cudaMemcpyAsync(dst, src, pool_bytes, cudaMemcpyDeviceToDevice, stream);
        err != cudaSuccess) {
      return ffi::Error::Internal(std::string("pagedjax_kv_write: pool copy: ") + cudaGetErrorString(err));
    }
  }
  if (s.num_tokens == 0 || s.row_bytes == 0) return ffi::Error::Success();
  if (s.num_tokens > 0x7fffffff) return ffi::Error::InvalidArgument("pagedjax_kv_write: too many tokens");
  cudaError_t err = cudaSuccess;
  if (s.fp8) {
    const void *kr = k.untyped_data(), *vr = v.untyped_data();
    const void *ks = k_scale.untyped_data(), *vs = v_scale.untyped_data();
    const int32_t* slots = slot_mapping.typed_data();
    switch (s.row_dtype) {
      case RowDType::kF32: err = LaunchFp8<float>(stream, kr, vr, slots, ks, vs, kd, vd, s); break;
      case RowDType::kF16: err = LaunchFp8<__half>(stream, kr, vr, slots, ks, vs, kd, vd, s); break;
      case RowDType::kBF16: err = LaunchFp8<__nv_bfloat16>(stream, kr, vr, slots, ks, vs, kd, vd, s); break;
      default: return ffi::Error::InvalidArgument("pagedjax_kv_write: unexpected row dtype");
    }
  } else {
    const void* ptrs[] = {k.untyped_data(), v.untyped_data(), kd, vd};
    bool vec16 = s.row_bytes % 16 == 0;
    for (const void* p : ptrs) vec16 = vec16 && Aligned(p, 16);
    err = vec16 ? Launch<int4>(stream, k.untyped_data(), v.untyped_data(), slot_mapping.typed_data(), kd, vd, s)
                : Launch<uint8_t>(stream, k.untyped_data(), v.untyped_data(), slot_mapping.typed_data(), kd, vd, s);
  }
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("pagedjax_kv_write: launch: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pagedjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxKvWriteCuda, pagedjax::KvWriteCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()        // k_pages
                                  .Arg<ffi::AnyBuffer>()        // v_pages
                                  .Arg<ffi::AnyBuffer>()        // k
                                  .Arg<ffi::AnyBuffer>()        // v
                                  .Arg<pagedjax::SlotBuffer>()  // slot_mapping
                                  .Arg<ffi::AnyBuffer>()        // k_scale
                                  .Arg<ffi::AnyBuffer>()        // v_scale
                                  .Ret<ffi::AnyBuffer>()        // k_pages (aliased)
                                  .Ret<ffi::AnyBuffer>(),       // v_pages (aliased)
                              {ffi::Traits::kCmdBufferCompatible});
