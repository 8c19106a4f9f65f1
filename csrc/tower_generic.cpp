// Portable implementation: plain loops the compiler may vectorise for the baseline instruction
// set. The bf16 precision is emulated (operands rounded to bf16, products summed in fp32), so
// both precisions run on any CPU.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "tower.h"

namespace srp4ctr {
namespace {

#include "tower_driver.inc"

template <bool kRoundA>
struct GenericOps {
  static constexpr bool kPairs = false;

  static void gemm(int M, const float* A, int lda, const BView& B, float* C, int ldc,
                   const float* bias, bool acc, Scratch& /*s*/) {
    const int N = B.N, K = B.K;
    for (int i = 0; i < M; ++i) {
      float* c = C + static_cast<size_t>(i) * ldc;
      if (!acc) std::fill(c, c + N, 0.f);
      if (bias)
        for (int n = 0; n < N; ++n) c[n] += bias[n];
      const float* a = A + static_cast<size_t>(i) * lda;
      for (int k = 0; k < K; ++k) {
        const float ak = kRoundA ? bf16_to_f32(f32_to_bf16(a[k])) : a[k];
        const float* b = B.f32 + static_cast<size_t>(k) * B.ldb;
        for (int n = 0; n < N; ++n) c[n] += ak * b[n];
      }
    }
  }

  static void softmax_rows(int M, int n, float* S, int lds, float scale, float* rinv) {
    for (int i = 0; i < M; ++i) {
      float* s = S + static_cast<size_t>(i) * lds;
      float mx = s[0];
      for (int j = 1; j < n; ++j) mx = std::max(mx, s[j]);
      float sum = 0.f;
      for (int j = 0; j < n; ++j) {
        s[j] = std::exp((s[j] - mx) * scale);
        sum += s[j];
      }
      rinv[i] = 1.0f / sum;
    }
  }

  static void layer_norm(int M, int d, const float* X, int ldx, const float* w, const float* b,
                         float* Y, int ldy, float eps) {
    layer_norm_scalar(M, d, X, ldx, w, b, Y, ldy, eps);
  }

  static void gather(const void* table, DType dt, const int64_t* ids, int M, int width, float* Y,
                     int ldy, const float* add) {
    gather_scalar(table, dt, ids, M, width, Y, ldy, add);
  }

  static void prefetch(const void*, DType, const int64_t*, int, int) {}

  static void gelu(float* x, int64_t count) {
    for (int64_t i = 0; i < count; ++i)
      x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
  }
};

}  // namespace

void encode_generic(const Encoder& e, const EncodeRequest& r) {
  encode_request<GenericOps<false>>(e, r);
}

void score_generic(const Model& m, const Request& r) {
  if (m.precision == Precision::kBF16)
    score_request<GenericOps<true>>(m, r, r.tile);
  else
    score_request<GenericOps<false>>(m, r, r.tile);
}

}  // namespace srp4ctr
