// KV page write, CPU handler: scatter new K/V rows into the page pool by slot (kv_write.h).
//
// The pools are aliased to the outputs (input_output_aliases {0: 0, 1: 1}), so XLA hands us the
// same buffers back and the write happens in place when the caller donates the pool. A slot
// outside [0, P * page_size) is a padding token and is dropped. An fp8 pool gets its rows
// quantized here (float_convert.h), with the scales checked on the host first.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "float_convert.h"
#include "kv_write.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pagedjax {
namespace {

float LoadRow(const void* rows, int64_t i, RowDType dt) {
  switch (dt) {
    case RowDType::kF16: return HalfToFloat(static_cast<const uint16_t*>(rows)[i]);
    case RowDType::kBF16: return Bf16ToFloat(static_cast<const uint16_t*>(rows)[i]);
    case RowDType::kF32: break;
  }
  return static_cast<const float*>(rows)[i];
}

// Token t's rows [K, H] quantized into pool slot `slot` (K * H bytes); inv[K] = 1 / scale.
void QuantizeRow(const void* rows, int64_t t, uint8_t* slot, const float* inv, const KvWriteShape& s) {
  const int64_t n = s.num_kv_heads * s.head_dim;
  for (int64_t i = 0; i < n; ++i)
    slot[i] = FloatToFp8E4M3(LoadRow(rows, t * n + i, s.row_dtype) * inv[i / s.head_dim]);
}

ffi::Error KvWriteCpuImpl(ffi::AnyBuffer k_pages,                 // [P, page, K, H]
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
  const int32_t* slots = slot_mapping.typed_data();
  struct Pair {
    const char* src;
    char* dst;
    const char* in_pool;
    const float* scale;
  } pairs[2] = {
      {static_cast<const char*>(k.untyped_data()), static_cast<char*>(k_out->untyped_data()),
       static_cast<const char*>(k_pages.untyped_data()), static_cast<const float*>(k_scale.untyped_data())},
      {static_cast<const char*>(v.untyped_data()), static_cast<char*>(v_out->untyped_data()),
       static_cast<const char*>(v_pages.untyped_data()), static_cast<const float*>(v_scale.untyped_data())},
  };
  if (s.fp8) {
    for (const Pair& p : pairs)
      for (int64_t h = 0; h < s.num_kv_heads; ++h)
        if (!std::isfinite(p.scale[h]) || p.scale[h] <= 0.f)
          return ffi::Error::InvalidArgument("pagedjax_kv_write: k_scale and v_scale must be finite and > 0, got " +
                                             std::to_string(p.scale[h]) + " for kv head " + std::to_string(h));
  }
  std::vector<float> inv(s.num_kv_heads);
  for (const Pair& p : pairs) {
    for (int64_t h = 0; h < s.num_kv_heads; ++h) inv[h] = 1.0f / p.scale[h];  // IEEE, as the contract says
    // XLA aliases the buffers; if it ever did not, start from the input pool.
    if (p.dst != p.in_pool) std::memcpy(p.dst, p.in_pool, s.num_slots * s.row_bytes);
    for (int64_t t = 0; t < s.num_tokens; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0 || slot >= s.num_slots) continue;  // padding token
      uint8_t* dst = reinterpret_cast<uint8_t*>(p.dst + slot * s.row_bytes);
      if (s.fp8) {
        QuantizeRow(p.src, t, dst, inv.data(), s);
      } else {
        std::memcpy(dst, p.src + t * s.row_bytes, s.row_bytes);
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pagedjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxKvWriteCpu, pagedjax::KvWriteCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()        // k_pages
                                  .Arg<ffi::AnyBuffer>()        // v_pages
                                  .Arg<ffi::AnyBuffer>()        // k
                                  .Arg<ffi::AnyBuffer>()        // v
                                  .Arg<pagedjax::SlotBuffer>()  // slot_mapping
                                  .Arg<ffi::AnyBuffer>()        // k_scale
                                  .Arg<ffi::AnyBuffer>()        // v_scale
                                  .Ret<ffi::AnyBuffer>()        // k_pages (aliased)
                                  .Ret<ffi::AnyBuffer>());      // v_pages (aliased)
