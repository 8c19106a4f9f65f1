// The candidate side of folded SRP4CTR inference on CPU: shared declarations.
//
// One request = one or more users, each with its cached per-layer K/V ([n, H, Dh] per layer)
// and head block, and its candidates (internal item ids). Per candidate (engine/folded.py):
//
//   z = z0[id];  for layer l:  q = (l == 0 ? q0[id] : LN1(z) Wq^T + bq)
//                              a_h = softmax(q_h K_h^T / sqrt(Dh)) V_h     (per head h)
//                              z += a Wo^T + bo;  z += gelu(LN2(z) W1^T + b1) W2^T + b2
//   h = hz0[id] + head_user + z Wzn^T;  for each remaining layer: h = relu(h) W^T + b
//   logit = h[0]
//
// Candidates are processed in tiles of rows; every matrix product is a small GEMM of a tile
// against a weight packed once when the model is built (fp32: [K][Npad]; bf16: pairs of K
// interleaved, [K/2][Npad][2], the operand layout of AVX512-BF16's vdpbf16ps).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace srp4ctr {

enum class Precision { kF32 = 0, kBF16 = 1 };
enum class Isa { kGeneric = 0, kAvx512 = 1, kAmx = 2, kAvx2 = 3, kNeon = 4 };
enum class DType { kF32 = 0, kBF16 = 1 };

// bf16 pair operands hold K rounded up to this many rows (zeros), so that AMX can read them in
// whole tiles of 32 (16 pairs); the AVX512-BF16 kernels read only the first ceil(K/2) pairs.
constexpr int kPairKPad = 32;

// A weight matrix in GEMM operand form: B[k][n] = W[n][k] for an nn.Linear weight W [N, K].
struct Packed {
  int K = 0, N = 0, ldb = 0;  // ldb = N rounded up to 16 (zero columns)
  bool pairs = false;         // bf16 pair layout
  std::vector<float> f32;     // [K][ldb]
  std::vector<uint16_t> bf16; // [round_up(K, kPairKPad) / 2][ldb][2]
};

struct LayerWeights {
  std::vector<float> ln1_w, ln1_b, bq, bo, ln2_w, ln2_b, b1, b2;
  Packed wq, wo, w1, w2;
};

struct Model {
  int d = 0, heads = 0, head_dim = 0, ffn = 0, h1 = 0;
  float eps = 0.f;  // LayerNorm epsilon (the model's, passed from Python)
  Precision precision = Precision::kF32;
  Isa isa = Isa::kGeneric;
  std::vector<LayerWeights> layers;
  Packed head_zn;                          // [d] -> [h1] (unused without layers)
  std::vector<Packed> rest;                // remaining head layers, ReLU before each
  std::vector<std::vector<float>> rest_b;  // their biases
};

// One user of a request: pointers into the caller's tensors (contiguous).
struct UserRef {
  const void* k = nullptr;  // [n_layers, n, H, Dh] in kv dtype
  const void* v = nullptr;
  const void* head_user = nullptr;  // [h1] in kv dtype
  int64_t n = 0;                    // history rows
  int64_t count = 0;                // candidates of this user
};

struct Request {
  const int64_t* ids = nullptr;  // [sum(count)] row indices into the tables
  int64_t n_rows = 0;            // rows of each table (ids are checked against it)
  const void* z0 = nullptr;      // [n_rows, d]
  const void* q0 = nullptr;      // [n_rows, d] (first layer's query; null without layers)
  const void* hz0 = nullptr;     // [n_rows, h1]
  DType table_dtype = DType::kF32;
  DType kv_dtype = DType::kF32;
  std::vector<UserRef> users;
  float* out = nullptr;  // [sum(count)] logits
  int threads = 1;
  int tile = 48;  // candidate rows per tile (a multiple of 48 avoids partial register blocks)
};

// ---------------------------------------------------------------- the user side (fp32)
struct AttnWeights {
  Packed wq, wk, wv, wo;
  std::vector<float> bq, bk, bv, bo;
};

struct EncLayerWeights {  // one FG-BERT layer (pre-LN)
  std::vector<float> ln1_w, ln1_b, ln2_w, ln2_b, b1, b2;
  AttnWeights attn;
  Packed w1, w2;
};

struct QBlockWeights {  // one Q-Former block
  std::vector<float> ln1_w, ln1_b, ln2_w, ln2_b, ln3_w, ln3_b, b1, b2;
  AttnWeights self_attn, cross_attn;
  Packed w1, w2;
};

struct Encoder {
  int d = 0, heads = 0, head_dim = 0, ffn = 0, n_queries = 0, h1 = 0;
  float eps = 0.f;  // LayerNorm epsilon of every norm of the user side (from Python)
  Isa isa = Isa::kGeneric;
  std::vector<EncLayerWeights> layers;
  std::vector<float> final_w, final_b;  // the encoder's final LayerNorm
  std::vector<QBlockWeights> qblocks;
  std::vector<float> qln_w, qln_b;      // the Q-Former's final LayerNorm
  Packed head_user;                     // [n_queries * d] -> [h1] (empty without a Q-Former)
  std::vector<float> head_b;            // [h1]
};

struct EncodeRequest {
  const float* x = nullptr;        // [n, d] the history's summed embeddings
  int64_t n = 0;
  const float* queries = nullptr;  // [n_queries, d] the Q-Former's queries (+ the user's offset)
  float* k = nullptr;              // [n_layers, n, d] out
  float* v = nullptr;              // [n_layers, n, d] out
  float* qtokens = nullptr;        // [n_queries, d] out
  float* head_user = nullptr;      // [h1] out
  int threads = 1;
};

// Implementations (one translation unit per instruction set).
void encode_generic(const Encoder& e, const EncodeRequest& r);
void encode_avx512(const Encoder& e, const EncodeRequest& r);
void encode_avx2(const Encoder& e, const EncodeRequest& r);
void encode_neon(const Encoder& e, const EncodeRequest& r);
void score_generic(const Model& m, const Request& r);
void score_avx512(const Model& m, const Request& r);
void score_avx2(const Model& m, const Request& r);
void score_neon(const Model& m, const Request& r);
void score_amx(const Model& m, const Request& r);  // bf16 only
bool amx_compiled();  // whether this build has the AMX kernels (the compiler knew AMX)
bool avx2_compiled();  // whether this build has the AVX2 kernels (an x86 build)
bool neon_compiled();  // whether this build has the NEON kernels (an aarch64 build)
bool neon_bf16_compiled();  // and their BFDOT kernels (the compiler knew +bf16)

// CPU feature detection (cpu_features.cpp).
bool cpu_has_avx2();         // avx2 + fma (and this build has the AVX2 kernels)
bool cpu_has_avx512();       // avx512f + bw + vl + dq
bool cpu_has_avx512_bf16();  // and avx512_bf16
bool cpu_has_amx_bf16();     // and AMX-TILE + AMX-BF16, with the OS's permission to use them
bool cpu_has_neon();         // aarch64 (Advanced SIMD is mandatory there) with the NEON kernels
bool cpu_has_neon_bf16();    // and FEAT_BF16 (BFDOT), with the BFDOT kernels compiled

// Building and running a model (model.cpp).
uint16_t to_bf16(float f);  // round to nearest even, NaN kept a NaN (torch's .to(bfloat16))
// Whether a model of this instruction set and precision takes bf16 pair operands (the bf16
// dot-product paths: AVX512-BF16, AMX, NEON BFDOT); the others multiply fp32 operands, rounded to
// bf16 values in bf16 precision.
bool uses_pairs(Isa isa, Precision precision);
// nn.Linear weight W [n_out, k_in] (row-major fp32) -> GEMM operand B[k][n]: bf16 pairs, or fp32
// (rounded to bf16 values when `round`).
Packed pack_weight(const float* W, int n_out, int k_in, bool pairs, bool round);
void score(const Model& m, const Request& r);        // on m.isa
void encode(const Encoder& e, const EncodeRequest& r);  // on e.isa

// Thread pool shared by every model: fn(task, worker) for task in [0, n_tasks).
void parallel_for(int n_tasks, int threads, void (*fn)(void*, int, int), void* ctx);

}  // namespace srp4ctr
