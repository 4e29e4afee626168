// INT4 weight-only GEMM (W4A16), CUDA handler: y [M, N] = x [M, K] @ dequant(w)^T.
//
// Dims: M rows of x, K in_features, N out_features, G groups along K, S K-splits.
//
// The weight arrives in pagedjax's tiled layout (pagedjax/quantization/weight.py):
// qvalue [N/16, K/64, 32 lanes, 4] int32, where lane l's four words are exactly the A
// fragments of four mma.m16n8k16 steps for the 16 x 64 tile, codes q in nibbles. The mma's
// M dimension is N (16 output columns) and its N dimension is the rows of x (8 at a time), so
// a decode batch of 1-16 rows still fills the tensor cores' large side with weights.
//
// Per lane and tile: one 16-byte streaming load of weights (read once from HBM), two 16-byte
// loads of x (L1/L2 hits: every warp of the CTA reads the same K-range of x), and per step
// (q - zero) made exactly in bf16/f16 by the magic-number trick: the nibble OR'd into the
// mantissa of 128.0 (bf16) or 1024.0 (f16) is 128 + q, and subtracting 128 + zero is exact.
// The mma accumulates sum_k x * (q - zero) in f32 per group; the group's scale multiplies
// the f32 sum when the group ends. Only the f32 accumulation rounds.
//
// Within a 64-wide K tile, K is permuted the same way for weights and x (lane t's steps
// cover K offsets 16t..16t+15), which is what lets x arrive in two contiguous loads.
//
// Grid: (ceil(N/16 / 8), S); CTA: 8 warps, one 16-column tile each, all over the same
// K-range (tiles [s * per, (s + 1) * per) of K/64). S > 1 writes f32 partials [S, rows, N]
// to the workspace and a second kernel sums them; S = 1 writes y directly. Rows of x go
// through in chunks of 64 (8 mma n-tiles per warp at most).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pagedjax {
namespace {

constexpr int kTileN = 16;     // output columns per warp tile (mma M)
constexpr int kTileK = 64;     // K per tile: four m16n8k16 steps
constexpr int kWarps = 8;      // warps per CTA
constexpr int kMaxRows = 64;   // rows of x per launch: 8 mma n8 tiles
constexpr int kUnroll = 4;     // weight tiles loaded ahead per warp

// Named buffer types: a comma inside XLA_FFI_DEFINE_HANDLER_SYMBOL's arguments would split them.
using QValueBuffer = ffi::Buffer<ffi::S32, 4>;
using ZeroBuffer = ffi::Buffer<ffi::U8, 2>;
using PartialBuffer = ffi::Buffer<ffi::F32, 1>;

enum ScaleType : int { kScaleF16 = 0, kScaleBF16 = 1, kScaleF32 = 2 };

struct Int4Params {
  const void* x;            // [rows, K] bf16/f16 (this launch's rows)
  const uint4* qvalue;      // [N/16, K/64, 32] 16-byte words
  const void* scale;        // [G, N]
  const uint8_t* zero;      // [G, N]
  void* out;                // [rows, N] x's dtype (S == 1)
  float* partial;           // [S, rows, N] f32 (S > 1)
  int64_t rows, n, k, group_size;
  int64_t tiles_per_split;  // K/64 tiles per split
  int scale_type;
};

// bf16 / f16: the magic constant (128.0 / 1024.0 in both halves), mma and conversions.
template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128.0: q | 0x4300 == 128 + q
  static __device__ __forceinline__ uint32_t Sub(uint32_t a, uint32_t b) {
    __nv_bfloat162 x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    __nv_bfloat162 r = __hsub2(x, y);
    uint32_t u;
    memcpy(&u, &r, 4);
    return u;
  }
  static __device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __nv_bfloat16 From(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Elem<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // f16 1024.0: q | 0x6400 == 1024 + q
  static __device__ __forceinline__ uint32_t Sub(uint32_t a, uint32_t b) {
    __half2 x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    __half2 r = __hsub2(x, y);
    uint32_t u;
    memcpy(&u, &r, 4);
    return u;
  }
  static __device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __half From(float v) { return __float2half_rn(v); }
};

// Weights are read exactly once: keep them out of L1, where x lives.
__device__ __forceinline__ uint4 LoadStreaming(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ float LoadScale(const Int4Params& p, int64_t i) {
  switch (p.scale_type) {
    case kScaleF16: return __half2float(static_cast<const __half*>(p.scale)[i]);
    case kScaleBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p.scale)[i]);
    default: return static_cast<const float*>(p.scale)[i];
  }
}

template <typename T, int MT, bool kSplit>
__global__ void __launch_bounds__(kWarps * 32) Int4GemmKernel(Int4Params p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma groupID / thread-in-group
  const int64_t ntile = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t n0 = ntile * kTileN;
  if (n0 >= p.n) return;  // no __syncthreads below: warps are independent
  const int64_t k_tiles = p.k / kTileK;
  const int64_t kt_begin = blockIdx.y * p.tiles_per_split;
  const int64_t kt_end = min(k_tiles, kt_begin + p.tiles_per_split);
  const uint4* wp = p.qvalue + ntile * k_tiles * 32 + lane;
  const T* x = static_cast<const T*>(p.x);

  float total[MT][4], acc[MT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) total[i][j] = acc[i][j] = 0.f;
  }
  int64_t group = -1;
  float s_lo = 0.f, s_hi = 0.f;  // the group's scales of columns n0 + g and n0 + g + 8
  uint32_t z_lo = 0, z_hi = 0;   // (magic + zero) in both halves, same columns

  auto flush = [&]() {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      total[i][0] += s_lo * acc[i][0];
      total[i][1] += s_lo * acc[i][1];
      total[i][2] += s_hi * acc[i][2];
      total[i][3] += s_hi * acc[i][3];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    }
  };

  for (int64_t kt0 = kt_begin; kt0 < kt_end; kt0 += kUnroll) {
    uint4 wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (kt0 + u < kt_end) wv[u] = LoadStreaming(wp + (kt0 + u) * 32);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t kt = kt0 + u;
      if (kt >= kt_end) break;
      const int64_t gi = kt * kTileK / p.group_size;
      if (gi != group) {
        if (group >= 0) flush();
        group = gi;
        const int64_t base = gi * p.n + n0 + g;
        s_lo = LoadScale(p, base);
        s_hi = LoadScale(p, base + 8);
        z_lo = (Elem<T>::kMagic & 0xFFFFu) | p.zero[base];
        z_hi = (Elem<T>::kMagic & 0xFFFFu) | p.zero[base + 8];
        z_lo |= z_lo << 16;
        z_hi |= z_hi << 16;
      }
      // A fragments of the four steps: register r of step s holds nibbles 4r and 16 + 4r of
      // word s; registers 0 and 2 are column n0 + g, 1 and 3 column n0 + g + 8.
      const uint32_t words[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
      uint32_t a[4][4];
#pragma unroll
      for (int s = 0; s < 4; ++s) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const uint32_t v = ((words[s] >> (4 * r)) & 0x000F000Fu) | Elem<T>::kMagic;
          a[s][r] = Elem<T>::Sub(v, (r & 1) ? z_hi : z_lo);
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int64_t m = i * 8 + g;  // the x row this lane's B fragments come from
        uint4 xa = make_uint4(0, 0, 0, 0), xb = make_uint4(0, 0, 0, 0);
        if (m < p.rows) {
          const uint4* xp = reinterpret_cast<const uint4*>(x + m * p.k + kt * kTileK + 16 * t);
          xa = __ldg(xp);
          xb = __ldg(xp + 1);
        }
        const uint32_t xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
        for (int s = 0; s < 4; ++s) Elem<T>::Mma(acc[i], a[s], xw[2 * s], xw[2 * s + 1]);
      }
    }
  }
  if (group >= 0) flush();

  // C fragment: c0, c1 are (column n0 + g, rows 2t, 2t + 1), c2, c3 column n0 + g + 8.
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = i * 8 + 2 * t + (j & 1);
      const int64_t n = n0 + g + (j >= 2 ? 8 : 0);
      if (m >= p.rows) continue;
      if constexpr (kSplit) {
        p.partial[(blockIdx.y * p.rows + m) * p.n + n] = total[i][j];
      } else {
        static_cast<T*>(p.out)[m * p.n + n] = Elem<T>::From(total[i][j]);
      }
    }
  }
}

template <typename T>
__global__ void Int4ReduceKernel(const float* __restrict__ partial, T* __restrict__ out, int64_t count,
                                 int splits) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int j = 0; j < splits; ++j) s += partial[j * count + i];
    out[i] = Elem<T>::From(s);
  }
}

template <typename T, int MT>
cudaError_t LaunchMain(cudaStream_t stream, const Int4Params& p, int splits) {
  const dim3 grid(static_cast<unsigned>((p.n / kTileN + kWarps - 1) / kWarps), static_cast<unsigned>(splits));
  if (splits > 1) {
    Int4GemmKernel<T, MT, true><<<grid, kWarps * 32, 0, stream>>>(p);
  } else {
    Int4GemmKernel<T, MT, false><<<grid, kWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t Launch(cudaStream_t stream, Int4Params p, int splits) {
  cudaError_t err;
  if (p.rows <= 8) {
    err = LaunchMain<T, 1>(stream, p, splits);
  } else if (p.rows <= 16) {
    err = LaunchMain<T, 2>(stream, p, splits);
  } else if (p.rows <= 32) {
    err = LaunchMain<T, 4>(stream, p, splits);
  } else {
    err = LaunchMain<T, 8>(stream, p, splits);
  }
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t count = p.rows * p.n;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((count + threads - 1) / threads, 4096);
  Int4ReduceKernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p.partial, static_cast<T*>(p.out),
                                                                            count, splits);
  return cudaGetLastError();
}

std::string Dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error Int4GemmCuda(cudaStream_t stream,
                        ffi::AnyBuffer x,                          // [M, K] bf16/f16
                        QValueBuffer qvalue,                       // [N/16, K/64, 32, 4]
                        ffi::AnyBuffer scale,                      // [G, N] f16/bf16/f32
                        ZeroBuffer zero,                           // [G, N]
                        ffi::Result<ffi::AnyBuffer> out,           // [M, N] x's dtype
                        ffi::Result<PartialBuffer> ws,             // [S * min(M, 64) * N] partials
                        int32_t group_size, int32_t num_splits) {
  auto bad = [](const std::string& msg) { return ffi::Error::InvalidArgument("pagedjax_int4_gemm: " + msg); };
  auto xd = x.dimensions(), qd = qvalue.dimensions(), sd = scale.dimensions(), zd = zero.dimensions();
  auto od = out->dimensions();
  if (xd.size() != 2 || sd.size() != 2 || od.size() != 2) {
    return bad("expected x [M, K], scale [G, N], out [M, N]; got x " + Dims(xd) + ", scale " + Dims(sd));
  }
  const int64_t M = xd[0], K = xd[1], N = qd[0] * kTileN;
  if (qd[1] * kTileK != K || qd[2] != 32 || qd[3] != 4) {
    return bad("qvalue " + Dims(qd) + " does not tile x's K = " + std::to_string(K) + " as [N/16, K/64, 32, 4]");
  }
  if (group_size <= 0 || K % group_size != 0 || (group_size % kTileK != 0 && group_size != K)) {
    return bad("group_size " + std::to_string(group_size) + " must divide K = " + std::to_string(K) +
               " and be a multiple of 64 (or K)");
  }
  const int64_t G = K / group_size;
  if (sd[0] != G || sd[1] != N || zd[0] != G || zd[1] != N) {
    return bad("scale " + Dims(sd) + " and zero " + Dims(zd) + " must be [" + std::to_string(G) + ", " +
               std::to_string(N) + "]");
  }
  if (od[0] != M || od[1] != N) return bad("out " + Dims(od) + " must be [M, N]");
  const ffi::DataType dt = x.element_type();
  if ((dt != ffi::DataType::BF16 && dt != ffi::DataType::F16) || out->element_type() != dt) {
    return bad("x and out must both be bf16 or both f16");
  }
  int scale_type;
  switch (scale.element_type()) {
    case ffi::DataType::F16: scale_type = kScaleF16; break;
    case ffi::DataType::BF16: scale_type = kScaleBF16; break;
    case ffi::DataType::F32: scale_type = kScaleF32; break;
    default: return bad("scale must be f16, bf16 or f32");
  }
  if (num_splits < 1 || num_splits > 64) return bad("num_splits must be in [1, 64]");
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t k_tiles = K / kTileK;
  const int64_t per = (k_tiles + num_splits - 1) / num_splits;
  const int splits = static_cast<int>((k_tiles + per - 1) / per);  // no empty split
  const int64_t chunk = std::min<int64_t>(M, kMaxRows);
  if (splits > 1 && static_cast<int64_t>(ws->element_count()) < splits * chunk * N) {
    return bad("workspace holds " + std::to_string(ws->element_count()) + " floats, needs " +
               std::to_string(splits * chunk * N));
  }
  if (reinterpret_cast<uintptr_t>(x.untyped_data()) % 16 != 0) return bad("x must be 16-byte aligned");

  const size_t elem = 2;
  for (int64_t row0 = 0; row0 < M; row0 += kMaxRows) {
    Int4Params p;
    p.x = static_cast<const char*>(x.untyped_data()) + row0 * K * elem;
    p.qvalue = reinterpret_cast<const uint4*>(qvalue.typed_data());
    p.scale = scale.untyped_data();
    p.zero = zero.typed_data();
    p.out = static_cast<char*>(out->untyped_data()) + row0 * N * elem;
    p.partial = ws->typed_data();
    p.rows = std::min<int64_t>(M - row0, kMaxRows);
    p.n = N;
    p.k = K;
    p.group_size = group_size;
    p.tiles_per_split = per;
    p.scale_type = scale_type;
    cudaError_t err = dt == ffi::DataType::BF16 ? Launch<__nv_bfloat16>(stream, p, splits)
                                                : Launch<__half>(stream, p, splits);
    if (err != cudaSuccess) {
      return ffi::Error::Internal(std::string("pagedjax_int4_gemm: launch failed: ") + cudaGetErrorString(err));
    }
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace pagedjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedjaxInt4GemmCuda, pagedjax::Int4GemmCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()               // x [M, K]
                                  .Arg<pagedjax::QValueBuffer>()       // qvalue [N/16, K/64, 32, 4]
                                  .Arg<ffi::AnyBuffer>()               // scale [G, N]
                                  .Arg<pagedjax::ZeroBuffer>()         // zero [G, N]
                                  .Ret<ffi::AnyBuffer>()               // y [M, N]
                                  .Ret<pagedjax::PartialBuffer>()      // workspace: f32 partials
                                  .Attr<int32_t>("group_size")
                                  .Attr<int32_t>("num_splits"),
                              {ffi::Traits::kCmdBufferCompatible});
