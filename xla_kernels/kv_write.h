// KV page write: shared shape checks for the CPU and CUDA handlers (FFI target "pagedjax_kv_write").
//
// Operands: pools k_pages, v_pages [P, page_size, K, H] (aliased to the results), new rows k, v
// [T, K, H], slot_mapping s32 [T], k_scale, v_scale f32 [K]. Token t's rows go to slot
// slot_mapping[t] = page * page_size + offset; a slot outside [0, P * page_size) is a padding token
// and is dropped. The rows are in the pool's dtype, or, for a float8_e4m3fn pool (the FP8 KV
// cache), in f32 / f16 / bf16 and quantized on the way in by float_convert.h's contract:
// stored = RoundNearestEven(clamp(x * (1 / scale[kv head]), -448, 448)). Other pools ignore the
// scales.
#ifndef PAGEDJAX_XLA_KERNELS_KV_WRITE_H_
#define PAGEDJAX_XLA_KERNELS_KV_WRITE_H_

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace pagedjax {

// One int32 per token. (A named type: a comma inside a macro argument splits it.)
using SlotBuffer = xla::ffi::Buffer<xla::ffi::S32, 1>;

// The rows' element type when the pool is fp8 (quantized on the way in).
enum class RowDType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct KvWriteShape {
  int64_t num_tokens;    // T
  int64_t num_slots;     // P * page_size
  int64_t num_kv_heads;  // K
  int64_t head_dim;      // H
  int64_t row_bytes;     // K * H * sizeof(pool dtype): one token's K (or V) row in the pool, contiguous
  bool fp8;              // the pool is float8_e4m3fn: rows are quantized with the scales
  RowDType row_dtype;    // the rows' dtype when fp8
};

inline std::string DimsToString(xla::ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// Validates pools [P, page, K, H], new rows [T, K, H], slots [T] and scales [K].
inline xla::ffi::Error CheckKvWrite(const xla::ffi::AnyBuffer& k_pages,
                                    const xla::ffi::AnyBuffer& v_pages,
                                    const xla::ffi::AnyBuffer& k, const xla::ffi::AnyBuffer& v,
                                    const xla::ffi::Buffer<xla::ffi::S32, 1>& slots,
                                    const xla::ffi::AnyBuffer& k_scale,
                                    const xla::ffi::AnyBuffer& v_scale, KvWriteShape* out) {
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
  const ffi::DataType pool_dt = k_pages.element_type(), row_dt = k.element_type();
  if (v_pages.element_type() != pool_dt || v.element_type() != row_dt) {
    return ffi::Error::InvalidArgument("pagedjax_kv_write: k_pages and v_pages, k and v must share dtypes");
  }
  out->fp8 = pool_dt == ffi::DataType::F8E4M3FN;
  out->row_dtype = RowDType::kF32;
  if (out->fp8) {
    switch (row_dt) {
      case ffi::DataType::F32: out->row_dtype = RowDType::kF32; break;
      case ffi::DataType::F16: out->row_dtype = RowDType::kF16; break;
      case ffi::DataType::BF16: out->row_dtype = RowDType::kBF16; break;
      default:
        return ffi::Error::InvalidArgument(
            "pagedjax_kv_write: rows for an f8e4m3fn pool must be f32, f16 or bf16 (quantized here)");
    }
  } else if (row_dt != pool_dt) {
    return ffi::Error::InvalidArgument("pagedjax_kv_write: pools and rows must share one dtype "
                                       "(or the pool is f8e4m3fn)");
  }
  for (const auto* s : {&k_scale, &v_scale}) {
    auto d = s->dimensions();
    if (s->element_type() != ffi::DataType::F32 || d.size() != 1 || d[0] != kp[2]) {
      return ffi::Error::InvalidArgument("pagedjax_kv_write: k_scale and v_scale must be f32[K] with K = " +
                                         std::to_string(kp[2]) + ", got " + DimsToString(d));
    }
  }
  out->num_tokens = kd[0];
  out->num_slots = kp[0] * kp[1];
  out->num_kv_heads = kp[2];
  out->head_dim = kp[3];
  out->row_bytes = out->num_slots == 0
                       ? 0
                       : static_cast<int64_t>(k_pages.size_bytes()) / out->num_slots;
  return ffi::Error::Success();
}

}  // namespace pagedjax

#endif  // PAGEDJAX_XLA_KERNELS_KV_WRITE_H_
