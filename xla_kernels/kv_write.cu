// KV page write, CUDA handler: scatter new K/V rows into the page pool by slot.
//
// One block per token copies that token's K and V rows (K * H elements each,
// contiguous in the token-major pool) with 16-byte vector stores when the row
// allows it. Pools are aliased to the outputs, so the write is in place.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

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

bool Aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

ffi::Error KvWriteCudaImpl(cudaStream_t stream,
                           ffi::AnyBuffer k_pages,                 // [P, page, K, H]
                           ffi::AnyBuffer v_pages,                 // [P, page, K, H]
                           ffi::AnyBuffer k,                       // [T, K, H]
                           ffi::AnyBuffer v,                       // [T, K, H]
                           ffi::Buffer<ffi::S32, 1> slot_mapping,  // [T]
                           ffi::Result<ffi::AnyBuffer> k_out,      // aliases k_pages
                           ffi::Result<ffi::AnyBuffer> v_out) {    // aliases v_pages
  KvWriteShape s{};
  if (ffi::Error err = CheckKvWrite(k_pages, v_pages, k, v, slot_mapping, &s); err.failure()) {
    return err;
  }
  void* kd = k_out->untyped_data();
  void* vd = v_out->untyped_data();
  const size_t pool_bytes = static_cast<size_t>(s.num_slots * s.row_bytes);
  // XLA aliases the pools; if it ever did not, start from the input pool.
  if (kd != k_pages.untyped_data() &&
      cudaMemcpyAsync(kd, k_pages.untyped_data(), pool_bytes, cudaMemcpyDeviceToDevice,
                      stream) != cudaSuccess) {
    return ffi::Error::Internal("pagedjax_kv_write: pool copy failed");
  }
  if (vd != v_pages.untyped_data() &&
      cudaMemcpyAsync(vd, v_pages.untyped_data(), pool_bytes, cudaMemcpyDeviceToDevice,
                      stream) != cudaSuccess) {
    return ffi::Error::Internal("pagedjax_kv_write: pool copy failed");
  }
  if (s.num_tokens == 0 || s.row_bytes == 0) return ffi::Error::Success();
  const void* ptrs[] = {k.untyped_data(), v.untyped_data(), kd, vd};
  bool vec16 = s.row_bytes % 16 == 0;
  for (const void* p : ptrs) vec16 = vec16 && Aligned(p, 16);
  cudaError_t err =
      vec16 ? Launch<int4>(stream, k.untyped_data(), v.untyped_data(), slot_mapping.typed_data(),
                           kd, vd, s)
            : Launch<uint8_t>(stream, k.untyped_data(), v.untyped_data(),
                              slot_mapping.typed_data(), kd, vd, s);
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("pagedjax_kv_write: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pagedjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxKvWriteCuda, pagedjax::KvWriteCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()            // k_pages
                                  .Arg<ffi::AnyBuffer>()            // v_pages
                                  .Arg<ffi::AnyBuffer>()            // k
                                  .Arg<ffi::AnyBuffer>()            // v
                                  .Arg<pagedjax::SlotBuffer>()  // slot_mapping
                                  .Ret<ffi::AnyBuffer>()            // k_pages (aliased)
                                  .Ret<ffi::AnyBuffer>(),           // v_pages (aliased)
                              {ffi::Traits::kCmdBufferCompatible});
