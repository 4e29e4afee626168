// KV page write: shared shape checks for the CPU and CUDA handlers.
#ifndef PAGEDJAX_XLA_KERNELS_KV_WRITE_H_
#define PAGEDJAX_XLA_KERNELS_KV_WRITE_H_

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace pagedjax {

// One int32 per token. (A named type: a comma inside a macro argument splits it.)
using SlotBuffer = xla::ffi::Buffer<xla::ffi::S32, 1>;

struct KvWriteShape {
  int64_t num_tokens;  // T
  int64_t num_slots;   // P * page_size
  int64_t row_bytes;   // K * H * sizeof(dtype): one token's K (or V) row, contiguous
};

inline std::string DimsToString(xla::ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// Validates pools [P, page, K, H], new rows [T, K, H] and slots [T].
inline xla::ffi::Error CheckKvWrite(const xla::ffi::AnyBuffer& k_pages,
                                    const xla::ffi::AnyBuffer& v_pages,
                                    const xla::ffi::AnyBuffer& k, const xla::ffi::AnyBuffer& v,
                                    const xla::ffi::Buffer<xla::ffi::S32, 1>& slots,
                                    KvWriteShape* out) {
  namespace ffi = xla::ffi;
  auto kp = k_pages.dimensions(), vp = v_pages.dimensions();
  auto kd = k.dimensions(), vd = v.dimensions();
  if (kp.size() != 4 || vp.size() != 4 || kd.size() != 3 || vd.size() != 3) {
    return ffi::Error::InvalidArgument(
        "pagedjax_kv_write: expected pools of rank 4 [P, page, K, H] and rows of rank 3 "
        "[T, K, H], got k_pages " + DimsToString(kp) + ", k " + DimsToString(kd));
  }
  for (int i = 0; i < 4; ++i) {
    if (kp[i] != vp[i]) {
      return ffi::Error::InvalidArgument("pagedjax_kv_write: k_pages " + DimsToString(kp) +
                                         " and v_pages " + DimsToString(vp) + " differ");
    }
  }
  for (int i = 0; i < 3; ++i) {
    if (kd[i] != vd[i]) {
      return ffi::Error::InvalidArgument("pagedjax_kv_write: k " + DimsToString(kd) +
                                         " and v " + DimsToString(vd) + " differ");
    }
  }
  if (kd[1] != kp[2] || kd[2] != kp[3]) {
    return ffi::Error::InvalidArgument("pagedjax_kv_write: rows " + DimsToString(kd) +
                                       " do not match the pool's [K, H] of " + DimsToString(kp));
  }
  if (slots.dimensions()[0] != kd[0]) {
    return ffi::Error::InvalidArgument("pagedjax_kv_write: slot_mapping has " +
                                       std::to_string(slots.dimensions()[0]) +
                                       " entries for " + std::to_string(kd[0]) + " tokens");
  }
  if (k_pages.element_type() != k.element_type() || v_pages.element_type() != v.element_type() ||
      k.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("pagedjax_kv_write: pools and rows must share one dtype");
  }
  out->num_tokens = kd[0];
  out->num_slots = kp[0] * kp[1];
  out->row_bytes = out->num_slots == 0
                       ? 0
                       : static_cast<int64_t>(k_pages.size_bytes()) / out->num_slots;
  return ffi::Error::Success();
}

}  // namespace pagedjax

#endif  // PAGEDJAX_XLA_KERNELS_KV_WRITE_H_
