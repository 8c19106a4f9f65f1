// What the bindings (module.cpp) and the C++ parity driver (tests/parity_driver.cpp) share to
// build and run a model: bf16 rounding, weight packing, the operand layout of an instruction set
// and the dispatch to its translation unit. Plain C++ (no target flags, no Python).
#include <cstring>

#include "tower.h"

namespace srp4ctr {

namespace {
int round_up(int x, int m) { return (x + m - 1) / m * m; }

float round_bf16(float f) {
  uint32_t u = static_cast<uint32_t>(to_bf16(f)) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}
}  // namespace

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

bool uses_pairs(Isa isa, Precision precision) {
  if (precision != Precision::kBF16) return false;
  return isa == Isa::kAvx512 || isa == Isa::kAmx || (isa == Isa::kNeon && cpu_has_neon_bf16());
}

Packed pack_weight(const float* W, int n_out, int k_in, bool pairs, bool round) {
  Packed p;
  p.K = k_in;
  p.N = n_out;
  p.ldb = round_up(p.N, 16);
  p.pairs = pairs;
  if (pairs) {
    const int K2 = round_up(p.K, kPairKPad) / 2;
    p.bf16.assign(static_cast<size_t>(K2) * p.ldb * 2, 0);
    for (int n = 0; n < p.N; ++n)
      for (int k = 0; k < p.K; ++k)
        p.bf16[(static_cast<size_t>(k / 2) * p.ldb + n) * 2 + (k & 1)] =
            to_bf16(W[static_cast<size_t>(n) * p.K + k]);
  } else {
    p.f32.assign(static_cast<size_t>(p.K) * p.ldb, 0.f);
    for (int n = 0; n < p.N; ++n)
      for (int k = 0; k < p.K; ++k) {
        const float x = W[static_cast<size_t>(n) * p.K + k];
        p.f32[static_cast<size_t>(k) * p.ldb + n] = round ? round_bf16(x) : x;
      }
  }
  return p;
}

void score(const Model& m, const Request& r) {
  switch (m.isa) {
    case Isa::kAmx: return score_amx(m, r);
    case Isa::kAvx512: return score_avx512(m, r);
    case Isa::kAvx2: return score_avx2(m, r);
    case Isa::kNeon: return score_neon(m, r);
    default: return score_generic(m, r);
  }
}

void encode(const Encoder& e, const EncodeRequest& r) {
  switch (e.isa) {
    case Isa::kAvx512: return encode_avx512(e, r);
    case Isa::kAvx2: return encode_avx2(e, r);
    case Isa::kNeon: return encode_neon(e, r);
    default: return encode_generic(e, r);
  }
}

}  // namespace srp4ctr
