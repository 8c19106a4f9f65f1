// AVX-512 implementation (fp32 FMA; bf16 with AVX512-BF16 vdpbf16ps, fp32 accumulation).
//
// Every function in this file is compiled for AVX-512 through the target pragma below, and the
// file is entered only after the CPU was checked (module.cpp), so the package still loads and
// runs its generic path on a CPU without AVX-512.
//
// GEMM: C[M x N] (+)= A[M x K] * B, B packed [K][ldb] (fp32) or [K/2][ldb][2] (bf16 pairs).
// The micro-kernel keeps an MR x (16 * NV) block of C in registers (MR * NV + NV + 1 <= 32 zmm),
// streams B rows and broadcasts A elements; N is covered in blocks of 64 columns with a masked
// store for the last vector, M in blocks of MR with smaller kernels for the remainder.
//
// AMX (bf16 only, where the CPU and the OS offer it): the same algorithm with every product on
// the tile unit, tiles of 16 rows x 32 bf16 (A), 16 pairs x 16 columns (B), 16 x 16 fp32 (C).
//
// On other architectures than x86 the file compiles to stubs that are never called.
#include "tower.h"

#if defined(__x86_64__) || defined(__i386__)

#if defined(__GNUC__) && !defined(__clang__)
#if __GNUC__ >= 11
#define SRP4CTR_AMX 1
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#endif
#elif defined(__clang__)
#if __clang_major__ >= 12
#define SRP4CTR_AMX 1
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16"))), apply_to = function)
#else
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"))), apply_to = function)
#endif
#endif

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace srp4ctr {
namespace {

#include "tower_driver.inc"

inline __mmask16 tail_mask(int cols) {  // cols in [1, 16]
  return static_cast<__mmask16>(cols >= 16 ? 0xffff : ((1u << cols) - 1u));
}

// exp(x) for x <= 0 (softmax arguments): Cephes expf's range reduction and minimax polynomial,
// 2^n applied with scalef; about 1 ulp.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// erf(x): Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), odd extension.
inline __m512 erf_ps(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  // t = 1 / (1 + p|x|): 14-bit reciprocal estimate and one Newton step (~1e-8 relative),
  // instead of a division
  const __m512 den = _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
  __m512 t = _mm512_rcp14_ps(den);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(ax, ax)));
  const __m512 y = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.0f));
  // copy the sign of x
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x80000000));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}

// ---------------------------------------------------------------------------- fp32 GEMM
// C block (+)= the accumulators + bias; the last vector column masked to the block's width.
template <int MR, int NV>
inline void store_block(const __m512 (&c)[MR][NV], float* C, int ldc, const float* bias, bool acc,
                        __mmask16 last) {
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    const __mmask16 mk = j == NV - 1 ? last : static_cast<__mmask16>(0xffff);
    const __m512 bj = bias ? _mm512_maskz_loadu_ps(mk, bias + 16 * j) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      float* cp = C + static_cast<size_t>(i) * ldc + 16 * j;
      __m512 v = _mm512_add_ps(c[i][j], bj);
      if (acc) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, cp));
      _mm512_mask_storeu_ps(cp, mk, v);
    }
  }
}

template <int MR, int NV>
inline void ukernel_f32(int K, const float* A, int lda, const float* B, int ldb, float* C,
                        int ldc, const float* bias, bool acc, __mmask16 last) {
  __m512 c[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[i][j] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_ps(B + static_cast<size_t>(k) * ldb + 16 * j);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[static_cast<size_t>(i) * lda + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] = _mm512_fmadd_ps(a, b[j], c[i][j]);
    }
  }
  store_block<MR, NV>(c, C, ldc, bias, acc, last);
}

// ---------------------------------------------------------------------------- bf16 GEMM
// A is bf16 [M][lda2] with K rounded up to even (zero pad); B pairs [K/2][ldb][2].
template <int MR, int NV>
inline void ukernel_bf16(int K2, const uint16_t* A, int lda, const uint16_t* B, int ldb,
                         float* C, int ldc, const float* bias, bool acc, __mmask16 last) {
  __m512 c[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[i][j] = _mm512_setzero_ps();
  for (int kp = 0; kp < K2; ++kp) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      b[j] = (__m512bh)_mm512_loadu_si512(B + (static_cast<size_t>(kp) * ldb + 16 * j) * 2);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, A + static_cast<size_t>(i) * lda + 2 * kp, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[i][j] = _mm512_dpbf16_ps(c[i][j], a, b[j]);
    }
  }
  store_block<MR, NV>(c, C, ldc, bias, acc, last);
}

// The fp32 or bf16 micro-kernel of NV vectors of columns, for gemm_rows (tower_driver.inc).
template <bool kBf16, int NV>
struct Cols {
  template <int R, class TA, class TB>
  static void run(int K, const TA* A, int lda, const TB* B, int ldb, float* C, int ldc,
                  const float* bias, bool acc, __mmask16 last) {
    if constexpr (kBf16)
      ukernel_bf16<R, NV>(K, A, lda, B, ldb, C, ldc, bias, acc, last);
    else
      ukernel_f32<R, NV>(K, A, lda, B, ldb, C, ldc, bias, acc, last);
  }
};

template <bool kBf16, class TA, class TB>
void gemm_blocks(int M, int N, int K, const TA* A, int lda, const TB* B, int ldb, float* C,
                 int ldc, const float* bias, bool acc) {
  constexpr int kElt = kBf16 ? 2 : 1;  // B elements per column per k step
  for (int n0 = 0; n0 < N; n0 += 64) {
    const int cols = std::min(64, N - n0);
    const int nv = (cols + 15) / 16;
    const __mmask16 last = tail_mask(cols - 16 * (nv - 1));
    const TB* Bn = B + static_cast<size_t>(n0) * kElt;
    float* Cn = C + n0;
    const float* bn = bias ? bias + n0 : nullptr;
    switch (nv) {
      case 4: gemm_rows<Cols<kBf16, 4>, 6>(M, K, A, lda, Bn, ldb, Cn, ldc, bn, acc, last); break;
      case 3: gemm_rows<Cols<kBf16, 3>, 8>(M, K, A, lda, Bn, ldb, Cn, ldc, bn, acc, last); break;
      case 2: gemm_rows<Cols<kBf16, 2>, 12>(M, K, A, lda, Bn, ldb, Cn, ldc, bn, acc, last); break;
      default: gemm_rows<Cols<kBf16, 1>, 16>(M, K, A, lda, Bn, ldb, Cn, ldc, bn, acc, last); break;
    }
  }
}

inline void softmax_rows_avx512(int M, int n, float* S, int lds, float scale, float* rinv) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int i = 0; i < M; ++i) {
    float* s = S + static_cast<size_t>(i) * lds;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 16 <= n; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
    if (j < n) mx = _mm512_mask_max_ps(mx, tail_mask(n - j), mx, _mm512_maskz_loadu_ps(tail_mask(n - j), s + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n; j += 16) {
      const __m512 p = exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), m), vs));
      _mm512_storeu_ps(s + j, p);
      sum = _mm512_add_ps(sum, p);
    }
    if (j < n) {
      const __mmask16 mk = tail_mask(n - j);
      const __m512 p = exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + j), m), vs));
      _mm512_mask_storeu_ps(s + j, mk, p);
      sum = _mm512_mask_add_ps(sum, mk, sum, p);
    }
    rinv[i] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}

inline void gelu_avx512(float* x, int64_t count) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f),
               rs2 = _mm512_set1_ps(0.70710678118654752f);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_mul_ps(half, v),
                                          _mm512_add_ps(one, erf_ps(_mm512_mul_ps(v, rs2)))));
  }
  if (i < count) {
    const __mmask16 mk = tail_mask(static_cast<int>(count - i));
    const __m512 v = _mm512_maskz_loadu_ps(mk, x + i);
    _mm512_mask_storeu_ps(x + i, mk, _mm512_mul_ps(_mm512_mul_ps(half, v),
                                                   _mm512_add_ps(one, erf_ps(_mm512_mul_ps(v, rs2)))));
  }
}

inline __m512 load16(const float* p, int left) {
  return left >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(tail_mask(left), p);
}

// LayerNorm over rows of width d (any d): two passes over the row in registers' worth of 16.
inline void layer_norm_avx512(int M, int d, const float* X, int ldx, const float* w,
                              const float* b, float* Y, int ldy, float eps) {
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int i = 0; i < M; ++i) {
    const float* x = X + static_cast<size_t>(i) * ldx;
    float* y = Y + static_cast<size_t>(i) * ldy;
    __m512 acc = _mm512_setzero_ps();
    for (int j = 0; j < d; j += 16) acc = _mm512_add_ps(acc, load16(x + j, d - j));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(acc) * inv_d);
    __m512 var = _mm512_setzero_ps();
    for (int j = 0; j < d; j += 16) {
      const __mmask16 mk = tail_mask(std::min(16, d - j));
      const __m512 t = _mm512_maskz_sub_ps(mk, load16(x + j, d - j), mean);
      var = _mm512_fmadd_ps(t, t, var);
    }
    const __m512 rstd =
        _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(var) * inv_d + eps));
    for (int j = 0; j < d; j += 16) {
      const int left = d - j;
      const __m512 t = _mm512_mul_ps(_mm512_sub_ps(load16(x + j, left), mean), rstd);
      const __m512 v = _mm512_fmadd_ps(t, load16(w + j, left), load16(b + j, left));
      _mm512_mask_storeu_ps(y + j, tail_mask(std::min(16, left)), v);
    }
  }
}

// Table rows are random accesses into tables that may live in L3 (or DRAM): ask for them early.
inline void prefetch_row(const void* table, DType dt, int64_t row, int width) {
  const int elt = dt == DType::kF32 ? 4 : 2;
  const char* p = static_cast<const char*>(table) + row * width * elt;
  for (int off = 0; off < width * elt; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
}

inline void prefetch_rows_avx512(const void* table, DType dt, const int64_t* ids, int M,
                                 int width) {
  for (int i = 0; i < M; ++i) prefetch_row(table, dt, ids[i], width);
}

// Y[i] = table[ids[i]] (+ add): fp32 rows copied with vector loads, bf16 rows widened.
inline void gather_avx512(const void* table, DType dt, const int64_t* ids, int M, int width,
                          float* Y, int ldy, const float* add) {
  constexpr int kAhead = 4;
  for (int i = 0; i < std::min(M, kAhead); ++i) prefetch_row(table, dt, ids[i], width);
  for (int i = 0; i < M; ++i) {
    float* y = Y + static_cast<size_t>(i) * ldy;
    if (i + kAhead < M) prefetch_row(table, dt, ids[i + kAhead], width);
    for (int j = 0; j < width; j += 16) {
      const int left = width - j;
      const __mmask16 mk = tail_mask(std::min(16, left));
      __m512 v;
      if (dt == DType::kF32) {
        v = _mm512_maskz_loadu_ps(mk, static_cast<const float*>(table) + ids[i] * width + j);
      } else {
        const __m256i h = _mm256_maskz_loadu_epi16(
            mk, static_cast<const uint16_t*>(table) + ids[i] * width + j);
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, add + j));
      _mm512_mask_storeu_ps(y + j, mk, v);
    }
  }
}

// The element-wise ops both precisions share (all in fp32).
struct Avx512Common {
  static void softmax_rows(int M, int n, float* S, int lds, float scale, float* rinv) {
    softmax_rows_avx512(M, n, S, lds, scale, rinv);
  }
  static void gelu(float* x, int64_t count) { gelu_avx512(x, count); }
  static void layer_norm(int M, int d, const float* X, int ldx, const float* w, const float* b,
                         float* Y, int ldy, float eps) {
    layer_norm_avx512(M, d, X, ldx, w, b, Y, ldy, eps);
  }
  static void gather(const void* table, DType dt, const int64_t* ids, int M, int width, float* Y,
                     int ldy, const float* add) {
    gather_avx512(table, dt, ids, M, width, Y, ldy, add);
  }
  static void prefetch(const void* table, DType dt, const int64_t* ids, int M, int width) {
    prefetch_rows_avx512(table, dt, ids, M, width);
  }
};

struct Avx512F32 : Avx512Common {
  static constexpr bool kPairs = false;
  static void gemm(int M, const float* A, int lda, const BView& B, float* C, int ldc,
                   const float* bias, bool acc, Scratch& /*s*/) {
    gemm_blocks<false>(M, B.N, B.K, A, lda, B.f32, B.ldb, C, ldc, bias, acc);
  }
};

// A [M x K] fp32 -> bf16 rows of lda2 (>= K, even) elements, zeros from K to lda2.
inline void to_bf16_rows(int M, int K, const float* A, int lda, uint16_t* dst0, int lda2) {
  for (int i = 0; i < M; ++i) {
    const float* src = A + static_cast<size_t>(i) * lda;
    uint16_t* dst = dst0 + static_cast<size_t>(i) * lda2;
    int k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k));
      _mm512_storeu_si512(dst + k, (__m512i)v);
    }
    for (; k < lda2; k += 16) {
      const int left = K - k;
      const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xffff)
                                      : (left > 0 ? tail_mask(left) : static_cast<__mmask16>(0));
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, src + k));
      const int w = std::min(16, lda2 - k);
      _mm256_mask_storeu_epi16(dst + k, static_cast<__mmask16>(tail_mask(w)), (__m256i)v);
    }
  }
}

struct Avx512Bf16 : Avx512Common {
  static constexpr bool kPairs = true;
  // A (fp32) is rounded to bf16 once per product into the scratch, K padded to even with zeros.
  static void gemm(int M, const float* A, int lda, const BView& B, float* C, int ldc,
                   const float* bias, bool acc, Scratch& s) {
    const int K = B.K, K2 = (K + 1) / 2, lda2 = 2 * K2;
    to_bf16_rows(M, K, A, lda, s.abf.data(), lda2);
    gemm_blocks<true>(M, B.N, K2, s.abf.data(), lda2, B.bf16, B.ldb, C, ldc, bias, acc);
  }
};

#ifdef SRP4CTR_AMX
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// C[rows x cols] (+)= T (a 16 x 16 fp32 tile as stored) + bias.
inline void store_tile(const float* T, int rows, int cols, float* C, int ldc, const float* bias,
                       bool acc) {
  const __mmask16 mk = tail_mask(cols);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mk, bias) : _mm512_setzero_ps();
  for (int i = 0; i < rows; ++i) {
    float* cp = C + static_cast<size_t>(i) * ldc;
    __m512 v = _mm512_add_ps(_mm512_load_ps(T + 16 * i), b);
    if (acc) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, cp));
    _mm512_mask_storeu_ps(cp, mk, v);
  }
}

struct AmxBf16 : Avx512Common {
  static constexpr bool kPairs = true;
  // A is rounded to bf16 into the scratch (K padded to 32 with zeros; the scratch has rows for
  // M rounded up to 16, whose extra rows only reach C rows that are never stored). B pairs hold
  // K rounded up to 32 (kPairKPad), so every product is whole tiles: C blocks of 32 x 32 in
  // tmm0-3, A in tmm4-5, B in tmm6-7. The tile configuration is loaded for each product (other
  // code on this thread, torch's oneDNN say, may use the tiles between two calls) and released
  // after it.
  static void gemm(int M, const float* A, int lda, const BView& B, float* C, int ldc,
                   const float* bias, bool acc, Scratch& s) {
    const int K = B.K, N = B.N, Kp = round_up(K, kPairKPad);
    uint16_t* a16 = s.abf.data();
    to_bf16_rows(M, K, A, lda, a16, Kp);
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    const long sa = static_cast<long>(Kp) * 2, sb = static_cast<long>(B.ldb) * 4;
    alignas(64) float out[4][256];
    for (int m0 = 0; m0 < M; m0 += 32) {
      const bool m2 = m0 + 16 < M;
      const uint16_t* a0 = a16 + static_cast<size_t>(m0) * Kp;
      const uint16_t* a1 = a0 + static_cast<size_t>(16) * Kp;
      for (int n0 = 0; n0 < N; n0 += 32) {
        const bool n2 = n0 + 16 < N;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int k0 = 0; k0 < Kp; k0 += 32) {
          const uint16_t* b0 = B.bf16 + (static_cast<size_t>(k0 / 2) * B.ldb + n0) * 2;
          _tile_loadd(4, a0 + k0, sa);
          _tile_loadd(6, b0, sb);
          _tile_dpbf16ps(0, 4, 6);
          if (n2) {
            _tile_loadd(7, b0 + 32, sb);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (m2) {
            _tile_loadd(5, a1 + k0, sa);
            _tile_dpbf16ps(2, 5, 6);
            if (n2) _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, out[0], 64);
        if (n2) _tile_stored(1, out[1], 64);
        if (m2) {
          _tile_stored(2, out[2], 64);
          if (n2) _tile_stored(3, out[3], 64);
        }
        const int r0 = std::min(16, M - m0), r1 = M - m0 - 16;
        const int c0 = std::min(16, N - n0), c1 = N - n0 - 16;
        float* Cb = C + static_cast<size_t>(m0) * ldc + n0;
        const float* bb = bias ? bias + n0 : nullptr;
        store_tile(out[0], r0, c0, Cb, ldc, bb, acc);
        if (n2) store_tile(out[1], r0, std::min(16, c1), Cb + 16, ldc, bb ? bb + 16 : nullptr, acc);
        if (m2) {
          float* Cm = Cb + static_cast<size_t>(16) * ldc;
          store_tile(out[2], std::min(16, r1), c0, Cm, ldc, bb, acc);
          if (n2)
            store_tile(out[3], std::min(16, r1), std::min(16, c1), Cm + 16, ldc,
                       bb ? bb + 16 : nullptr, acc);
        }
      }
    }
    _tile_release();
  }
};
#endif  // SRP4CTR_AMX

}  // namespace

bool amx_compiled() {
#ifdef SRP4CTR_AMX
  return true;
#else
  return false;
#endif
}

void score_amx(const Model& m, const Request& r) {
#ifdef SRP4CTR_AMX
  score_request<AmxBf16>(m, r, r.tile);
#else
  (void)m;
  (void)r;
  throw std::runtime_error("srp4ctr._C was compiled without AMX support");
#endif
}

void encode_avx512(const Encoder& e, const EncodeRequest& r) { encode_request<Avx512F32>(e, r); }

void score_avx512(const Model& m, const Request& r) {
  if (m.precision == Precision::kBF16)
    score_request<Avx512Bf16>(m, r, r.tile);
  else
    score_request<Avx512F32>(m, r, r.tile);
}

}  // namespace srp4ctr

#if defined(__clang__)
#pragma clang attribute pop
#endif

#else  // not x86

#include <stdexcept>

namespace srp4ctr {
bool amx_compiled() { return false; }
void encode_avx512(const Encoder&, const EncodeRequest&) {
  throw std::runtime_error("srp4ctr._C was compiled without AVX-512 support");
}
void score_avx512(const Model&, const Request&) {
  throw std::runtime_error("srp4ctr._C was compiled without AVX-512 support");
}
void score_amx(const Model&, const Request&) {
  throw std::runtime_error("srp4ctr._C was compiled without AMX support");
}
}  // namespace srp4ctr

#endif
