// KV page write, CPU handler: scatter new K/V rows into the page pool by slot.
//
// The pools are aliased to the outputs (input_output_aliases {0: 0, 1: 1}), so
// XLA hands us the same buffers back and the write happens in place when the
// caller donates the pool. A slot outside [0, P * page_size) is a padding
// token and is dropped.
#include <cstdint>
#include <cstring>
#include <string>

#include "kv_write.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pagedjax {

static ffi::Error KvWriteCpuImpl(ffi::AnyBuffer k_pages,   // [P, page, K, H]
                                 ffi::AnyBuffer v_pages,   // [P, page, K, H]
                                 ffi::AnyBuffer k,         // [T, K, H]
                                 ffi::AnyBuffer v,         // [T, K, H]
                                 ffi::Buffer<ffi::S32, 1> slot_mapping,  // [T]
                                 ffi::Result<ffi::AnyBuffer> k_out,      // aliases k_pages
                                 ffi::Result<ffi::AnyBuffer> v_out) {    // aliases v_pages
  KvWriteShape s{};
  if (ffi::Error err = CheckKvWrite(k_pages, v_pages, k, v, slot_mapping, &s); err.failure()) {
    return err;
  }
  const int32_t* slots = slot_mapping.typed_data();
  struct Pair {
    const char* src;
    char* dst;
    const char* in_pool;
  } pairs[2] = {
      {static_cast<const char*>(k.untyped_data()), static_cast<char*>(k_out->untyped_data()),
       static_cast<const char*>(k_pages.untyped_data())},
      {static_cast<const char*>(v.untyped_data()), static_cast<char*>(v_out->untyped_data()),
       static_cast<const char*>(v_pages.untyped_data())},
  };
  for (const Pair& p : pairs) {
    // XLA aliases the buffers; if it ever did not, start from the input pool.
    if (p.dst != p.in_pool) std::memcpy(p.dst, p.in_pool, s.num_slots * s.row_bytes);
    for (int64_t t = 0; t < s.num_tokens; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0 || slot >= s.num_slots) continue;  // padding token
      std::memcpy(p.dst + slot * s.row_bytes, p.src + t * s.row_bytes, s.row_bytes);
    }
  }
  return ffi::Error::Success();
}

}  // namespace pagedjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxKvWriteCpu, pagedjax::KvWriteCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()           // k_pages
                                  .Arg<ffi::AnyBuffer>()           // v_pages
                                  .Arg<ffi::AnyBuffer>()           // k
                                  .Arg<ffi::AnyBuffer>()           // v
                                  .Arg<pagedjax::SlotBuffer>()  // slot_mapping
                                  .Ret<ffi::AnyBuffer>()           // k_pages (aliased)
                                  .Ret<ffi::AnyBuffer>());         // v_pages (aliased)
