// NEON (Advanced SIMD) implementation for AArch64 CPUs (Arm Neoverse servers: AWS Graviton,
// Ampere Altra, Azure Cobalt; Apple M-series).
//
// Advanced SIMD is mandatory on AArch64, so this file is compiled for the baseline and entered on
// every aarch64 CPU; on other architectures it compiles to stubs that are never called
// (module.cpp checks first).
//
// GEMM: C[M x N] (+)= A[M x K] * B, B packed [K][ldb] fp32 (ldb a multiple of 16, zero columns).
// The micro-kernel keeps an MR x (4 * NV) block of C in q registers (MR * NV + NV + 1 <= 32:
// 6 x 16, 8 x 12, 12 x 8, 16 x 4), streams B rows and broadcasts A elements (ld1r); N is covered
// in blocks of 16 columns, the last vector of a block stored lane by lane when it is partial, M
// in blocks of MR with smaller kernels for the remainder.
//
// bf16 precision: with FEAT_BF16 (Neoverse V1/V2/N2, Graviton 3/4; detected on Linux), products
// with BFDOT on pairs of k interleaved in the packed operands (the layout of AVX512-BF16, the same
// kernel shapes), the A operand rounded to bf16 per product, sums in fp32 — the roundings of the
// AVX512-BF16 path. Without it (Neoverse N1, Graviton 2, Altra; other OSes) bf16 is a storage
// format, as on AVX2: weights rounded to bf16 once when packed, K/V and the per-item tables read
// as stored, every product in fp32 on those values.
#include "tower.h"

#if defined(__aarch64__)

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstring>

// The BFDOT kernels need the compiler's bf16 intrinsics and per-function target selection.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define SRP4CTR_NEON_BF16 1
#endif

namespace srp4ctr {
namespace {

#include "tower_driver.inc"

// all-ones in the first `cols` lanes (cols in [0, 4])
inline uint32x4_t lane_mask(int cols) {
  static const uint32_t kIdx[4] = {0, 1, 2, 3};
  return vcltq_u32(vld1q_u32(kIdx), vdupq_n_u32(static_cast<uint32_t>(std::max(cols, 0))));
}

inline float32x4_t load4(const float* p, int left) {
  if (left >= 4) return vld1q_f32(p);
  float t[4] = {0.f, 0.f, 0.f, 0.f};
  for (int i = 0; i < left; ++i) t[i] = p[i];
  return vld1q_f32(t);
}

inline void store4(float* p, float32x4_t v, int left) {
  if (left >= 4) {
    vst1q_f32(p, v);
    return;
  }
  float t[4];
  vst1q_f32(t, v);
  for (int i = 0; i < left; ++i) p[i] = t[i];
}

// exp(x) for x <= 0 (softmax arguments) and for -x^2 (erf): Cephes expf's range reduction and
// minimax polynomial (as tower_avx2.cpp), 2^n built in the exponent bits (n >= -126 after the
// clamp); about 1 ulp.
inline float32x4_t exp_ps(float32x4_t x) {
  x = vmaxq_f32(x, vdupq_n_f32(-87.33654f));
  const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
  r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
  p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
  p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
  p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

// erf(x): Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), odd extension.
inline float32x4_t erf_ps(float32x4_t x) {
  const float32x4_t one = vdupq_n_f32(1.0f);
  const float32x4_t ax = vabsq_f32(x);
  // t = 1 / (1 + p|x|): 8-bit reciprocal estimate and two Newton steps (~1 ulp)
  const float32x4_t den = vfmaq_f32(one, ax, vdupq_n_f32(0.3275911f));
  float32x4_t t = vrecpeq_f32(den);
  t = vmulq_f32(t, vrecpsq_f32(den, t));
  t = vmulq_f32(t, vrecpsq_f32(den, t));
  float32x4_t p = vdupq_n_f32(1.061405429f);
  p = vfmaq_f32(vdupq_n_f32(-1.453152027f), p, t);
  p = vfmaq_f32(vdupq_n_f32(1.421413741f), p, t);
  p = vfmaq_f32(vdupq_n_f32(-0.284496736f), p, t);
  p = vfmaq_f32(vdupq_n_f32(0.254829592f), p, t);
  p = vmulq_f32(p, t);
  const float32x4_t e = exp_ps(vnegq_f32(vmulq_f32(ax, ax)));
  const float32x4_t y = vfmsq_f32(one, p, e);
  return vbslq_f32(vdupq_n_u32(0x80000000u), x, y);  // the sign of x
}

// ---------------------------------------------------------------------------- GEMM
// C block (+)= the accumulators + bias; the last vector column cut to the block's width.
template <int MR, int NV>
inline void store_block(const float32x4_t (&c)[MR][NV], float* C, int ldc, const float* bias,
                        bool acc, int last) {
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const int w = j == NV - 1 ? last : 4;
    const float32x4_t bj = bias ? load4(bias + 4 * j, w) : vdupq_n_f32(0.f);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      float* cp = C + static_cast<size_t>(i) * ldc + 4 * j;
      float32x4_t v = vaddq_f32(c[i][j], bj);
      if (acc) v = vaddq_f32(v, load4(cp, w));
      store4(cp, v, w);
    }
  }
}

// GCC's scheduling before register allocation (on by default for aarch64) hoists the MR loads
// of A above the FMAs, which then needs more than 32 registers and spills accumulators in the
// inner loop; without it the loop is the MR * NV FMAs, NV loads of B and MR of A. The kernels
// are compiled without it (out-of-order cores do not need it).
#if defined(__GNUC__) && !defined(__clang__)
#define SRP4CTR_KERNELS_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC optimize(\"no-schedule-insns\")")
#define SRP4CTR_KERNELS_END _Pragma("GCC pop_options")
#else
#define SRP4CTR_KERNELS_BEGIN
#define SRP4CTR_KERNELS_END
#endif

SRP4CTR_KERNELS_BEGIN
// fp32 kernels: NV vectors of 4 columns, A [M][lda] fp32, B [K][ldb] fp32.
template <int NV>
struct F32Kernel {
  static constexpr int kElt = 1;  // B elements per column per k step
  template <int MR>
  static void run(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                  const float* bias, bool acc, int last) {
    float32x4_t c[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] = vdupq_n_f32(0.f);
    for (int k = 0; k < K; ++k) {
      float32x4_t b[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) b[j] = vld1q_f32(B + static_cast<size_t>(k) * ldb + 4 * j);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const float32x4_t a = vld1q_dup_f32(A + static_cast<size_t>(i) * lda + k);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) c[i][j] = vfmaq_f32(c[i][j], a, b[j]);
      }
    }
    store_block<MR, NV>(c, C, ldc, bias, acc, last);
  }
};
SRP4CTR_KERNELS_END

// Columns in blocks of 16: NV = the block's vectors, MR the most rows that fit the registers.
template <template <int> class Kern, class TA, class TB>
void gemm_blocks(int M, int N, int K, const TA* A, int lda, const TB* B, int ldb, float* C,
                 int ldc, const float* bias, bool acc) {
  for (int n0 = 0; n0 < N; n0 += 16) {
    const int cols = std::min(16, N - n0);
    const int nv = (cols + 3) / 4, last = cols - 4 * (nv - 1);
    const TB* Bn = B + static_cast<size_t>(n0) * Kern<1>::kElt;
    float* Cn = C + n0;
    const float* bn = bias ? bias + n0 : nullptr;
    switch (nv) {
      case 4: gemm_rows<Kern<4>, 6>(M, K, A, lda, Bn, ldb, Cn, ldc, bn, acc, last); break;
      case 3: gemm_rows<Kern<3>, 8>(M, K, A, lda, Bn, ldb, Cn, ldc, bn, acc, last); break;
      case 2: gemm_rows<Kern<2>, 12>(M, K, A, lda, Bn, ldb, Cn, ldc, bn, acc, last); break;
      default: gemm_rows<Kern<1>, 16>(M, K, A, lda, Bn, ldb, Cn, ldc, bn, acc, last); break;
    }
  }
}

#ifdef SRP4CTR_NEON_BF16
// The BFDOT kernels are compiled for FEAT_BF16 (entered only where the CPU has it); what they
// call from outside this region is plain Advanced SIMD.
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+bf16")
#pragma GCC optimize("no-schedule-insns")

// bf16 kernels: A bf16 [M][lda] with K rounded up to even (zero pad), B pairs [K/2][ldb][2]; each
// BFDOT adds a pair of k's products to each of 4 columns.
template <int NV>
struct Bf16Kernel {
  static constexpr int kElt = 2;
  template <int MR>
  static void run(int K2, const uint16_t* A, int lda, const uint16_t* B, int ldb, float* C,
                  int ldc, const float* bias, bool acc, int last) {
    float32x4_t c[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] = vdupq_n_f32(0.f);
    for (int kp = 0; kp < K2; ++kp) {
      bfloat16x8_t b[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j)
        b[j] = vreinterpretq_bf16_u16(vld1q_u16(B + (static_cast<size_t>(kp) * ldb + 4 * j) * 2));
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        uint32_t pair;
        std::memcpy(&pair, A + static_cast<size_t>(i) * lda + 2 * kp, 4);
        const bfloat16x4_t a = vreinterpret_bf16_u32(vdup_n_u32(pair));
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) c[i][j] = vbfdotq_lane_f32(c[i][j], b[j], a, 0);
      }
    }
    store_block<MR, NV>(c, C, ldc, bias, acc, last);
  }
};

// A [M x K] fp32 -> bf16 rows of lda2 (>= K, even) elements, rounded to nearest even (BFCVTN),
// zeros from K to lda2.
inline void to_bf16_rows(int M, int K, const float* A, int lda, uint16_t* dst0, int lda2) {
  for (int i = 0; i < M; ++i) {
    const float* src = A + static_cast<size_t>(i) * lda;
    uint16_t* dst = dst0 + static_cast<size_t>(i) * lda2;
    int k = 0;
    for (; k + 8 <= K; k += 8) {
      const bfloat16x8_t v =
          vcvtq_high_bf16_f32(vcvtq_low_bf16_f32(vld1q_f32(src + k)), vld1q_f32(src + k + 4));
      vst1q_u16(dst + k, vreinterpretq_u16_bf16(v));
    }
    for (; k < K; ++k) dst[k] = f32_to_bf16(src[k]);
    for (; k < lda2; ++k) dst[k] = 0;
  }
}

void gemm_bf16(int M, const float* A, int lda, const BView& B, float* C, int ldc,
               const float* bias, bool acc, Scratch& s) {
  const int K = B.K, K2 = (K + 1) / 2, lda2 = 2 * K2;
  to_bf16_rows(M, K, A, lda, s.abf.data(), lda2);
  gemm_blocks<Bf16Kernel>(M, B.N, K2, s.abf.data(), lda2, B.bf16, B.ldb, C, ldc, bias, acc);
}

#pragma GCC pop_options
#endif  // SRP4CTR_NEON_BF16

// ---------------------------------------------------------------------------- element-wise
inline void softmax_rows_neon(int M, int n, float* S, int lds, float scale, float* rinv) {
  const float32x4_t vs = vdupq_n_f32(scale);
  for (int i = 0; i < M; ++i) {
    float* s = S + static_cast<size_t>(i) * lds;
    float32x4_t mx = vdupq_n_f32(-INFINITY);
    int j = 0;
    for (; j + 4 <= n; j += 4) mx = vmaxq_f32(mx, vld1q_f32(s + j));
    float m = vmaxvq_f32(mx);
    for (int t = j; t < n; ++t) m = std::max(m, s[t]);
    const float32x4_t vm = vdupq_n_f32(m);
    float32x4_t sum = vdupq_n_f32(0.f);
    for (j = 0; j < n; j += 4) {
      const int left = n - j;
      float32x4_t p = exp_ps(vmulq_f32(vsubq_f32(load4(s + j, left), vm), vs));
      if (left < 4)
        p = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(p), lane_mask(left)));
      store4(s + j, p, left);
      sum = vaddq_f32(sum, p);
    }
    rinv[i] = 1.0f / vaddvq_f32(sum);
  }
}

inline void gelu_neon(float* x, int64_t count) {
  const float32x4_t half = vdupq_n_f32(0.5f), one = vdupq_n_f32(1.0f),
                    rs2 = vdupq_n_f32(0.70710678118654752f);
  for (int64_t i = 0; i < count; i += 4) {
    const int left = static_cast<int>(std::min<int64_t>(4, count - i));
    const float32x4_t v = load4(x + i, left);
    store4(x + i, vmulq_f32(vmulq_f32(half, v), vaddq_f32(one, erf_ps(vmulq_f32(v, rs2)))),
           left);
  }
}

// LayerNorm over rows of width d (any d): mean, then the biased variance, in vectors of 4.
inline void layer_norm_neon(int M, int d, const float* X, int ldx, const float* w,
                            const float* b, float* Y, int ldy, float eps) {
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int i = 0; i < M; ++i) {
    const float* x = X + static_cast<size_t>(i) * ldx;
    float* y = Y + static_cast<size_t>(i) * ldy;
    float32x4_t acc = vdupq_n_f32(0.f);
    for (int j = 0; j < d; j += 4) acc = vaddq_f32(acc, load4(x + j, d - j));
    const float32x4_t mean = vdupq_n_f32(vaddvq_f32(acc) * inv_d);
    float32x4_t var = vdupq_n_f32(0.f);
    for (int j = 0; j < d; j += 4) {
      const int left = d - j;
      float32x4_t t = vsubq_f32(load4(x + j, left), mean);
      if (left < 4)
        t = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(t), lane_mask(left)));
      var = vfmaq_f32(var, t, t);
    }
    const float32x4_t rstd = vdupq_n_f32(1.0f / std::sqrt(vaddvq_f32(var) * inv_d + eps));
    for (int j = 0; j < d; j += 4) {
      const int left = d - j;
      const float32x4_t t = vmulq_f32(vsubq_f32(load4(x + j, left), mean), rstd);
      store4(y + j, vfmaq_f32(load4(b + j, left), t, load4(w + j, left)), left);
    }
  }
}

// Table rows are random accesses into tables that may live in L3 (or DRAM): ask for them early.
inline void prefetch_row(const void* table, DType dt, int64_t row, int width) {
  const int elt = dt == DType::kF32 ? 4 : 2;
  const char* p = static_cast<const char*>(table) + row * width * elt;
  for (int off = 0; off < width * elt; off += 64) __builtin_prefetch(p + off, 0, 2);
}

// Y[i] = table[ids[i]] (+ add): fp32 rows copied with vector loads, bf16 rows widened.
inline void gather_neon(const void* table, DType dt, const int64_t* ids, int M, int width,
                        float* Y, int ldy, const float* add) {
  constexpr int kAhead = 4;
  for (int i = 0; i < std::min(M, kAhead); ++i) prefetch_row(table, dt, ids[i], width);
  for (int i = 0; i < M; ++i) {
    float* y = Y + static_cast<size_t>(i) * ldy;
    if (i + kAhead < M) prefetch_row(table, dt, ids[i + kAhead], width);
    if (dt == DType::kF32) {
      const float* src = static_cast<const float*>(table) + ids[i] * width;
      for (int j = 0; j < width; j += 4) {
        const int left = width - j;
        float32x4_t v = load4(src + j, left);
        if (add) v = vaddq_f32(v, load4(add + j, left));
        store4(y + j, v, left);
      }
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(table) + ids[i] * width;
      int j = 0;
      for (; j + 4 <= width; j += 4) {
        float32x4_t v = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(src + j), 16));
        if (add) v = vaddq_f32(v, vld1q_f32(add + j));
        vst1q_f32(y + j, v);
      }
      for (; j < width; ++j) y[j] = bf16_to_f32(src[j]) + (add ? add[j] : 0.f);
    }
  }
}

// The element-wise ops both precisions share (all in fp32).
struct NeonCommon {
  static void softmax_rows(int M, int n, float* S, int lds, float scale, float* rinv) {
    softmax_rows_neon(M, n, S, lds, scale, rinv);
  }
  static void gelu(float* x, int64_t count) { gelu_neon(x, count); }
  static void layer_norm(int M, int d, const float* X, int ldx, const float* w, const float* b,
                         float* Y, int ldy, float eps) {
    layer_norm_neon(M, d, X, ldx, w, b, Y, ldy, eps);
  }
  static void gather(const void* table, DType dt, const int64_t* ids, int M, int width, float* Y,
                     int ldy, const float* add) {
    gather_neon(table, dt, ids, M, width, Y, ldy, add);
  }
  static void prefetch(const void* table, DType dt, const int64_t* ids, int M, int width) {
    for (int i = 0; i < M; ++i) prefetch_row(table, dt, ids[i], width);
  }
};

// fp32, and bf16 as a storage format (weights rounded when packed, products in fp32).
struct NeonF32 : NeonCommon {
  static constexpr bool kPairs = false;
  static void gemm(int M, const float* A, int lda, const BView& B, float* C, int ldc,
                   const float* bias, bool acc, Scratch& /*s*/) {
    gemm_blocks<F32Kernel>(M, B.N, B.K, A, lda, B.f32, B.ldb, C, ldc, bias, acc);
  }
};

#ifdef SRP4CTR_NEON_BF16
struct NeonBf16 : NeonCommon {
  static constexpr bool kPairs = true;
  static void gemm(int M, const float* A, int lda, const BView& B, float* C, int ldc,
                   const float* bias, bool acc, Scratch& s) {
    gemm_bf16(M, A, lda, B, C, ldc, bias, acc, s);
  }
};
#endif

}  // namespace

bool neon_compiled() { return true; }

bool neon_bf16_compiled() {
#ifdef SRP4CTR_NEON_BF16
  return true;
#else
  return false;
#endif
}

void encode_neon(const Encoder& e, const EncodeRequest& r) { encode_request<NeonF32>(e, r); }

// bf16 precision: BFDOT on pair operands where the CPU has FEAT_BF16 (the model was packed so,
// uses_pairs), else the products run in fp32 on the bf16-rounded weights and the stored K/V.
void score_neon(const Model& m, const Request& r) {
#ifdef SRP4CTR_NEON_BF16
  if (uses_pairs(m.isa, m.precision)) return score_request<NeonBf16>(m, r, r.tile);
#endif
  score_request<NeonF32>(m, r, r.tile);
}

}  // namespace srp4ctr

#else  // not aarch64: never entered (module.cpp checks the CPU first)

#include <stdexcept>

namespace srp4ctr {
bool neon_compiled() { return false; }
bool neon_bf16_compiled() { return false; }
void encode_neon(const Encoder&, const EncodeRequest&) {
  throw std::runtime_error("srp4ctr._C was compiled without NEON support (not an aarch64 build)");
}
void score_neon(const Model&, const Request&) {
  throw std::runtime_error("srp4ctr._C was compiled without NEON support (not an aarch64 build)");
}
}  // namespace srp4ctr

#endif
