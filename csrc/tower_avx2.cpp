// AVX2 + FMA implementation (the x86-64 CPUs without AVX-512: AMD Zen 1-3, Intel client chips).
//
// Every function in this file is compiled for AVX2 + FMA through the target pragma below, and
// the file is entered only after the CPU was checked (module.cpp), so the package still loads
// and runs its generic path on an x86-64 CPU without AVX2. On other architectures it compiles to
// stubs that are never called.
//
// GEMM: C[M x N] (+)= A[M x K] * B, B packed [K][ldb] fp32 (ldb a multiple of 16, zero columns).
// The micro-kernel keeps an MR x (8 * NV) block of C in ymm registers (MR * NV + NV + 1 <= 16:
// 6 x 16 or 12 x 8), streams B rows and broadcasts A elements; N is covered in blocks of 16
// columns with a masked store for the last vector, M in blocks of MR with smaller kernels for
// the remainder.
//
// bf16 precision: AVX2 has no bf16 arithmetic, so bf16 is a storage format here — weights rounded
// to bf16 once when packed, K/V and the per-item tables read as stored (bf16, half the memory of
// fp32) — and every product runs in fp32 on those values (activations are not rounded, so it is
// closer to fp32 than the bf16 dot-product paths are).
#include "tower.h"

#if defined(__x86_64__) || defined(__i386__)

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#endif

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace srp4ctr {
namespace {

#include "tower_driver.inc"

// all-ones in the first `cols` lanes (cols in [0, 8])
inline __m256i lane_mask(int cols) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256 load8(const float* p, int left) {
  return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(left));
}

inline void store8(float* p, __m256 v, int left) {
  if (left >= 8)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, lane_mask(left), v);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (softmax arguments) and for -x^2 (erf): Cephes expf's range reduction and
// minimax polynomial, 2^n built in the exponent bits (n >= -126 after the clamp); about 1 ulp.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// erf(x): Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), odd extension.
inline __m256 erf_ps(__m256 x) {
  const __m256 sign_bit = _mm256_castsi256_ps(_mm256_set1_epi32(0x80000000));
  const __m256 ax = _mm256_andnot_ps(sign_bit, x);
  // t = 1 / (1 + p|x|): 12-bit reciprocal estimate and one Newton step (~2e-7 relative)
  const __m256 den = _mm256_fmadd_ps(ax, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f));
  __m256 t = _mm256_rcp_ps(den);
  t = _mm256_mul_ps(t, _mm256_fnmadd_ps(den, t, _mm256_set1_ps(2.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(ax, ax)));
  const __m256 y = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
  return _mm256_or_ps(y, _mm256_and_ps(x, sign_bit));
}

// ---------------------------------------------------------------------------- fp32 GEMM
// C block (+)= the accumulators + bias; the last vector column masked to the block's width.
template <int MR, int NV>
inline void store_block(const __m256 (&c)[MR][NV], float* C, int ldc, const float* bias,
                        bool acc, int last) {
#pragma GCC unroll 2
  for (int j = 0; j < NV; ++j) {
    const int w = j == NV - 1 ? last : 8;
    const __m256 bj = bias ? load8(bias + 8 * j, w) : _mm256_setzero_ps();
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      float* cp = C + static_cast<size_t>(i) * ldc + 8 * j;
      __m256 v = _mm256_add_ps(c[i][j], bj);
      if (acc) v = _mm256_add_ps(v, load8(cp, w));
      store8(cp, v, w);
    }
  }
}

template <int MR, int NV>
inline void ukernel(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                    const float* bias, bool acc, int last) {
  __m256 c[MR][NV];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) c[i][j] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m256 b[NV];
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) b[j] = _mm256_loadu_ps(B + static_cast<size_t>(k) * ldb + 8 * j);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_set1_ps(A[static_cast<size_t>(i) * lda + k]);
#pragma GCC unroll 2
      for (int j = 0; j < NV; ++j) c[i][j] = _mm256_fmadd_ps(a, b[j], c[i][j]);
    }
  }
  store_block<MR, NV>(c, C, ldc, bias, acc, last);
}

// The micro-kernel of NV vectors of columns, for gemm_rows (tower_driver.inc).
template <int NV>
struct Cols {
  template <int MR>
  static void run(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                  const float* bias, bool acc, int last) {
    ukernel<MR, NV>(K, A, lda, B, ldb, C, ldc, bias, acc, last);
  }
};

void gemm_blocks(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
                 int ldc, const float* bias, bool acc) {
  for (int n0 = 0; n0 < N; n0 += 16) {
    const int cols = std::min(16, N - n0);
    const float* Bn = B + n0;
    float* Cn = C + n0;
    const float* bn = bias ? bias + n0 : nullptr;
    if (cols > 8)
      gemm_rows<Cols<2>, 6>(M, K, A, lda, Bn, ldb, Cn, ldc, bn, acc, cols - 8);
    else
      gemm_rows<Cols<1>, 12>(M, K, A, lda, Bn, ldb, Cn, ldc, bn, acc, cols);
  }
}

// ---------------------------------------------------------------------------- element-wise
inline void softmax_rows_avx2(int M, int n, float* S, int lds, float scale, float* rinv) {
  const __m256 vs = _mm256_set1_ps(scale);
  for (int i = 0; i < M; ++i) {
    float* s = S + static_cast<size_t>(i) * lds;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 8 <= n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j));
    float m = hmax(mx);
    for (int t = j; t < n; ++t) m = std::max(m, s[t]);
    const __m256 vm = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (j = 0; j < n; j += 8) {
      const int left = n - j;
      __m256 p = exp_ps(_mm256_mul_ps(_mm256_sub_ps(load8(s + j, left), vm), vs));
      if (left < 8) p = _mm256_and_ps(p, _mm256_castsi256_ps(lane_mask(left)));
      store8(s + j, p, left);
      sum = _mm256_add_ps(sum, p);
    }
    rinv[i] = 1.0f / hsum(sum);
  }
}

inline void gelu_avx2(float* x, int64_t count) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f),
               rs2 = _mm256_set1_ps(0.70710678118654752f);
  for (int64_t i = 0; i < count; i += 8) {
    const int left = static_cast<int>(std::min<int64_t>(8, count - i));
    const __m256 v = load8(x + i, left);
    store8(x + i, _mm256_mul_ps(_mm256_mul_ps(half, v),
                                _mm256_add_ps(one, erf_ps(_mm256_mul_ps(v, rs2)))), left);
  }
}

// LayerNorm over rows of width d (any d): mean, then the biased variance, in vectors of 8.
inline void layer_norm_avx2(int M, int d, const float* X, int ldx, const float* w,
                            const float* b, float* Y, int ldy, float eps) {
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int i = 0; i < M; ++i) {
    const float* x = X + static_cast<size_t>(i) * ldx;
    float* y = Y + static_cast<size_t>(i) * ldy;
    __m256 acc = _mm256_setzero_ps();
    for (int j = 0; j < d; j += 8) acc = _mm256_add_ps(acc, load8(x + j, d - j));
    const __m256 mean = _mm256_set1_ps(hsum(acc) * inv_d);
    __m256 var = _mm256_setzero_ps();
    for (int j = 0; j < d; j += 8) {
      const int left = d - j;
      __m256 t = _mm256_sub_ps(load8(x + j, left), mean);
      if (left < 8) t = _mm256_and_ps(t, _mm256_castsi256_ps(lane_mask(left)));
      var = _mm256_fmadd_ps(t, t, var);
    }
    const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(hsum(var) * inv_d + eps));
    for (int j = 0; j < d; j += 8) {
      const int left = d - j;
      const __m256 t = _mm256_mul_ps(_mm256_sub_ps(load8(x + j, left), mean), rstd);
      store8(y + j, _mm256_fmadd_ps(t, load8(w + j, left), load8(b + j, left)), left);
    }
  }
}

// Table rows are random accesses into tables that may live in L3 (or DRAM): ask for them early.
inline void prefetch_row(const void* table, DType dt, int64_t row, int width) {
  const int elt = dt == DType::kF32 ? 4 : 2;
  const char* p = static_cast<const char*>(table) + row * width * elt;
  for (int off = 0; off < width * elt; off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
}

// Y[i] = table[ids[i]] (+ add): fp32 rows copied with vector loads, bf16 rows widened.
inline void gather_avx2(const void* table, DType dt, const int64_t* ids, int M, int width,
                        float* Y, int ldy, const float* add) {
  constexpr int kAhead = 4;
  for (int i = 0; i < std::min(M, kAhead); ++i) prefetch_row(table, dt, ids[i], width);
  for (int i = 0; i < M; ++i) {
    float* y = Y + static_cast<size_t>(i) * ldy;
    if (i + kAhead < M) prefetch_row(table, dt, ids[i + kAhead], width);
    if (dt == DType::kF32) {
      const float* src = static_cast<const float*>(table) + ids[i] * width;
      for (int j = 0; j < width; j += 8) {
        const int left = width - j;
        __m256 v = load8(src + j, left);
        if (add) v = _mm256_add_ps(v, load8(add + j, left));
        store8(y + j, v, left);
      }
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(table) + ids[i] * width;
      int j = 0;
      for (; j + 8 <= width; j += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
        __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(add + j));
        _mm256_storeu_ps(y + j, v);
      }
      for (; j < width; ++j) y[j] = bf16_to_f32(src[j]) + (add ? add[j] : 0.f);
    }
  }
}

struct Avx2Ops {
  static constexpr bool kPairs = false;
  static void gemm(int M, const float* A, int lda, const BView& B, float* C, int ldc,
                   const float* bias, bool acc, Scratch& /*s*/) {
    gemm_blocks(M, B.N, B.K, A, lda, B.f32, B.ldb, C, ldc, bias, acc);
  }
  static void softmax_rows(int M, int n, float* S, int lds, float scale, float* rinv) {
    softmax_rows_avx2(M, n, S, lds, scale, rinv);
  }
  static void gelu(float* x, int64_t count) { gelu_avx2(x, count); }
  static void layer_norm(int M, int d, const float* X, int ldx, const float* w, const float* b,
                         float* Y, int ldy, float eps) {
    layer_norm_avx2(M, d, X, ldx, w, b, Y, ldy, eps);
  }
  static void gather(const void* table, DType dt, const int64_t* ids, int M, int width, float* Y,
                     int ldy, const float* add) {
    gather_avx2(table, dt, ids, M, width, Y, ldy, add);
  }
  static void prefetch(const void* table, DType dt, const int64_t* ids, int M, int width) {
    for (int i = 0; i < M; ++i) prefetch_row(table, dt, ids[i], width);
  }
};

}  // namespace

bool avx2_compiled() { return true; }

void encode_avx2(const Encoder& e, const EncodeRequest& r) { encode_request<Avx2Ops>(e, r); }

// bf16 precision: the weights were rounded to bf16 when packed, K/V and the tables are read as
// stored; the products run in fp32 on those values.
void score_avx2(const Model& m, const Request& r) { score_request<Avx2Ops>(m, r, r.tile); }

}  // namespace srp4ctr

#if defined(__clang__)
#pragma clang attribute pop
#endif

#else  // not x86: never entered (module.cpp checks the CPU first)

#include <stdexcept>

namespace srp4ctr {
bool avx2_compiled() { return false; }
void encode_avx2(const Encoder&, const EncodeRequest&) {
  throw std::runtime_error("srp4ctr._C was compiled without AVX2 support");
}
void score_avx2(const Model&, const Request&) {
  throw std::runtime_error("srp4ctr._C was compiled without AVX2 support");
}
}  // namespace srp4ctr

#endif
