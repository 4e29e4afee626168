// Host conversions between f32 and the storage types of q, the pool and the output (CPU
// handlers). 16-bit floats round to nearest even and keep NaN; fp8 is float8_e4m3fn (OCP / NVIDIA
// E4M3: no infinities, one NaN per sign, largest finite 448), the FP8 KV cache's format.
//
// FP8 quantization contract (the same in the jnp write, the CPU and the CUDA handlers):
//   inv = 1 / scale                                   (f32, IEEE division, once per kv head)
//   stored = RoundNearestEven(clamp(f32(x) * inv, -448, 448)) in float8_e4m3fn
// A product by the reciprocal, not a quotient: XLA itself rewrites x / broadcast(scale) into
// x * broadcast(1 / scale), so that is the form every path can compute bit for bit. NaN stays NaN
// (its sign kept), +-inf saturate to +-448, values below half the smallest subnormal (2^-9) round
// to a signed zero, a tie between two neighbours picks the one with an even last bit (so 464 ->
// 448). This is ml_dtypes' f32 -> float8_e4m3fn conversion of the clamped product, bit for bit.
// Read back: f32(stored) * scale.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pagedjax {

inline constexpr float kFp8E4M3Max = 448.0f;

inline uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float Bf16ToFloat(uint16_t h) { return FromBits(static_cast<uint32_t>(h) << 16); }

inline uint16_t FloatToBf16(float f) {
  uint32_t x = Bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

inline float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return FromBits(sign);
    int e = -1;  // subnormal: shift the leading one into the implicit bit
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    return FromBits(sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13));
  }
  if (exp == 31) return FromBits(sign | 0x7f800000u | (mant << 13));
  return FromBits(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

inline uint16_t FloatToHalf(float f) {  // after F. Giesen's float_to_half_fast3_rtne
  const uint32_t kF32Inf = 255u << 23, kF16Max = (127u + 16u) << 23;
  const uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t x = Bits(f);
  uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint32_t o;
  if (x >= kF16Max) {
    o = x > kF32Inf ? 0x7e00u : 0x7c00u;
  } else if (x < (113u << 23)) {  // result is subnormal or zero: let the FPU round
    o = Bits(FromBits(x) + FromBits(kDenormMagic)) - kDenormMagic;
  } else {
    uint32_t mant_odd = (x >> 13) & 1u;
    x += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    x += mant_odd;
    o = x >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

inline float Fp8E4M3ToFloat(uint8_t b) {
  const float sign = (b & 0x80u) ? -1.0f : 1.0f;
  const int exp = (b >> 3) & 0xf, mant = b & 0x7;
  if (exp == 0xf && mant == 0x7) return std::copysign(std::nanf(""), sign);
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mant), -9);  // subnormal: mant * 2^-9
  return sign * std::ldexp(static_cast<float>(8 + mant), exp - 7 - 3);
}

// RoundNearestEven(clamp(x, -448, 448)) as float8_e4m3fn bits (see the contract above).
inline uint8_t FloatToFp8E4M3(float x) {
  const uint32_t u = Bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;  // |x|
  if (a > 0x7f800000u) return sign | 0x7f;             // NaN
  if (FromBits(a) >= kFp8E4M3Max) return sign | 0x7e;  // saturate (inf too): 448
  if (a < (121u << 23)) {  // |x| < 2^-6: the subnormal step 2^-9; |x| * 2^9 < 8 is exact in f32
    const float steps = FromBits(a) * 512.0f;
    uint32_t m = static_cast<uint32_t>(steps);  // floor
    const float frac = steps - static_cast<float>(m);  // exact
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) ++m;  // m == 8 is 2^-6, the smallest normal
    return sign | static_cast<uint8_t>(m);
  }
  // Normal: keep 3 of f32's 23 mantissa bits, round to nearest even on the 20 dropped; a carry
  // into the exponent is right, and |x| < 448 never rounds past 448.
  const uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
  const int exp = static_cast<int>(r >> 23) - 127 + 7;  // in [1, 15]
  return sign | static_cast<uint8_t>((exp << 3) | ((r >> 20) & 0x7u));
}

}  // namespace pagedjax
