// Parity of every instruction-set path this CPU has against the portable one, in C++ alone (no
// Python, no pybind11): random models built directly in the C++ structures (packed with the
// extension's own pack_weight), random requests, the candidate side's logits and the user side's
// outputs compared with the generic path's.
//
//   fp32                           equal to the generic path to 1e-5 (relative, |ref| >= 1)
//   bf16 as a storage format       (AVX2, NEON without BFDOT) equal to the generic path's fp32
//                                  products on the same bf16-rounded weights and stored K/V, 1e-5
//   bf16 dot products              (NEON BFDOT, AVX512-BF16, AMX) against the generic emulation
//                                  (the same bf16 roundings of the operands), 1e-2: only the fp32
//                                  sums' order differs, which may move an activation's rounding
//
// Built with tower_generic.cpp, tower_avx2.cpp, tower_avx512.cpp, tower_neon.cpp, model.cpp,
// cpu_features.cpp and threadpool.cpp (csrc/tests/arm_parity.sh cross-compiles it for aarch64 and
// runs it under qemu; natively it checks the x86 paths). Exit status 1 on a mismatch (the first
// ones are printed), 0 otherwise; the last line of the output is the summary.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tower.h"

using namespace srp4ctr;

namespace {

constexpr float kEps = 1e-5f;  // LayerNorm epsilon
constexpr double kTolF32 = 1e-5, kTolPairs = 1e-2;

struct Rng {  // splitmix64
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }
  float normal() {  // Box-Muller
    const float u1 = uniform() + 1e-7f, u2 = uniform();
    return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853f * u2);
  }
  std::vector<float> vec(size_t n, float scale, float center = 0.f) {
    std::vector<float> v(n);
    for (auto& x : v) x = center + scale * normal();
    return v;
  }
};

// ---------------------------------------------------------------- random weights
struct Linear {  // nn.Linear: w [out][in], b [out]
  int out = 0, in = 0;
  std::vector<float> w, b;
};

Linear linear(Rng& g, int out, int in) {
  return {out, in, g.vec(static_cast<size_t>(out) * in, 0.8f / std::sqrt(static_cast<float>(in))),
          g.vec(out, 0.1f)};
}

struct Norm {
  std::vector<float> w, b;
};

Norm norm(Rng& g, int d) { return {g.vec(d, 0.1f, 1.0f), g.vec(d, 0.1f)}; }

Packed pack(const Linear& l, bool pairs = false, bool round = false) {
  return pack_weight(l.w.data(), l.out, l.in, pairs, round);
}

struct RawLayer {
  Norm ln1, ln2;
  Linear q, o, f1, f2;
};

struct RawModel {  // the candidate side's weights, unpacked
  int d = 0, heads = 0, ffn = 0, h1 = 0;
  std::vector<RawLayer> layers;
  Linear head_zn;
  std::vector<Linear> rest;
};

RawModel raw_model(Rng& g, int d, int heads, int n_layers, const std::vector<int>& head) {
  RawModel r;
  r.d = d;
  r.heads = heads;
  r.ffn = 4 * d;
  r.h1 = head[0];
  for (int l = 0; l < n_layers; ++l)
    r.layers.push_back({norm(g, d), norm(g, d), linear(g, d, d), linear(g, d, d),
                        linear(g, r.ffn, d), linear(g, d, r.ffn)});
  r.head_zn = linear(g, r.h1, d);
  for (size_t j = 1; j <= head.size(); ++j)
    r.rest.push_back(linear(g, j < head.size() ? head[j] : 1, head[j - 1]));
  return r;
}

Model make_model(const RawModel& raw, Isa isa, Precision prec) {
  Model m;
  m.d = raw.d;
  m.heads = raw.heads;
  m.head_dim = raw.d / raw.heads;
  m.ffn = raw.ffn;
  m.h1 = raw.h1;
  m.eps = kEps;
  m.precision = prec;
  m.isa = isa;
  const bool pairs = uses_pairs(isa, prec), round = prec == Precision::kBF16;
  for (const RawLayer& l : raw.layers) {
    LayerWeights w;
    w.ln1_w = l.ln1.w;
    w.ln1_b = l.ln1.b;
    w.ln2_w = l.ln2.w;
    w.ln2_b = l.ln2.b;
    w.bq = l.q.b;
    w.bo = l.o.b;
    w.b1 = l.f1.b;
    w.b2 = l.f2.b;
    w.wq = pack(l.q, pairs, round);
    w.wo = pack(l.o, pairs, round);
    w.w1 = pack(l.f1, pairs, round);
    w.w2 = pack(l.f2, pairs, round);
    m.layers.push_back(std::move(w));
  }
  if (!raw.layers.empty()) m.head_zn = pack(raw.head_zn, pairs, round);
  for (const Linear& l : raw.rest) {
    m.rest.push_back(pack(l, pairs, round));
    m.rest_b.push_back(l.b);
  }
  return m;
}

AttnWeights attn(Rng& g, int d) {
  const Linear q = linear(g, d, d), k = linear(g, d, d), v = linear(g, d, d), o = linear(g, d, d);
  return {pack(q), pack(k), pack(v), pack(o), q.b, k.b, v.b, o.b};
}

void ffn(Rng& g, int d, int F, Packed& w1, std::vector<float>& b1, Packed& w2,
         std::vector<float>& b2) {
  const Linear a = linear(g, F, d), b = linear(g, d, F);
  w1 = pack(a);
  b1 = a.b;
  w2 = pack(b);
  b2 = b.b;
}

Encoder make_encoder(Rng& g, int d, int heads, int n_layers, int n_queries, int n_qblocks,
                     int h1) {
  Encoder e;
  e.d = d;
  e.heads = heads;
  e.head_dim = d / heads;
  e.ffn = 4 * d;
  e.n_queries = n_queries;
  e.h1 = h1;
  e.eps = kEps;
  for (int l = 0; l < n_layers; ++l) {
    EncLayerWeights w;
    Norm a = norm(g, d), b = norm(g, d);
    w.ln1_w = a.w;
    w.ln1_b = a.b;
    w.ln2_w = b.w;
    w.ln2_b = b.b;
    w.attn = attn(g, d);
    ffn(g, d, e.ffn, w.w1, w.b1, w.w2, w.b2);
    e.layers.push_back(std::move(w));
  }
  Norm f = norm(g, d);
  e.final_w = f.w;
  e.final_b = f.b;
  for (int i = 0; n_queries && i < n_qblocks; ++i) {
    QBlockWeights b;
    Norm n1 = norm(g, d), n2 = norm(g, d), n3 = norm(g, d);
    b.ln1_w = n1.w;
    b.ln1_b = n1.b;
    b.ln2_w = n2.w;
    b.ln2_b = n2.b;
    b.ln3_w = n3.w;
    b.ln3_b = n3.b;
    b.self_attn = attn(g, d);
    b.cross_attn = attn(g, d);
    ffn(g, d, e.ffn, b.w1, b.b1, b.w2, b.b2);
    e.qblocks.push_back(std::move(b));
  }
  const Linear hu = linear(g, h1, std::max(n_queries, 1) * d);
  e.head_b = hu.b;
  if (n_queries) {
    Norm q = norm(g, d);
    e.qln_w = q.w;
    e.qln_b = q.b;
    e.head_user = pack(hu);
  }
  return e;
}

// ---------------------------------------------------------------- random requests
struct Buf {  // values as fp32 and as bf16
  std::vector<float> f;
  std::vector<uint16_t> h;
  explicit Buf(std::vector<float> v = {}) : f(std::move(v)), h(f.size()) {
    for (size_t i = 0; i < f.size(); ++i) h[i] = to_bf16(f[i]);
    if (f.empty()) {  // a valid address for an empty history
      f.push_back(0.f);
      h.push_back(0);
    }
  }
  const void* get(DType dt) const {
    return dt == DType::kF32 ? static_cast<const void*>(f.data()) : h.data();
  }
};

struct UserData {
  int64_t n = 0, count = 0;
  Buf k, v, head_user;
};

struct Scenario {
  int64_t rows = 0, total = 0;
  Buf z0, q0, hz0;
  std::vector<int64_t> ids;
  std::vector<UserData> users;
};

Scenario scenario(Rng& g, const RawModel& m, const std::vector<int64_t>& ns,
                  const std::vector<int64_t>& counts) {
  Scenario s;
  s.rows = 97;
  const int d = m.d, L = static_cast<int>(m.layers.size());
  s.z0 = Buf(g.vec(static_cast<size_t>(s.rows) * d, 0.7f));
  s.q0 = Buf(g.vec(static_cast<size_t>(s.rows) * d, 0.7f));
  s.hz0 = Buf(g.vec(static_cast<size_t>(s.rows) * m.h1, 0.5f));
  for (size_t u = 0; u < ns.size(); ++u) {
    UserData ud;
    ud.n = ns[u];
    ud.count = counts[u];
    ud.k = Buf(g.vec(static_cast<size_t>(L) * ns[u] * d, 0.7f));
    ud.v = Buf(g.vec(static_cast<size_t>(L) * ns[u] * d, 0.7f));
    ud.head_user = Buf(g.vec(m.h1, 0.5f));
    s.users.push_back(std::move(ud));
    for (int64_t c = 0; c < counts[u]; ++c)
      s.ids.push_back(static_cast<int64_t>(g.next() % s.rows));
    s.total += counts[u];
  }
  return s;
}

std::vector<float> run_score(const Model& m, const Scenario& s, DType dt, int threads, int tile) {
  std::vector<float> out(s.total, NAN);
  Request r;
  r.ids = s.ids.data();
  r.n_rows = s.rows;
  r.z0 = s.z0.get(dt);
  r.q0 = s.q0.get(dt);
  r.hz0 = s.hz0.get(dt);
  r.table_dtype = r.kv_dtype = dt;
  for (const UserData& u : s.users) {
    UserRef ref;
    ref.k = u.k.get(dt);
    ref.v = u.v.get(dt);
    ref.head_user = u.head_user.get(dt);
    ref.n = u.n;
    ref.count = u.count;
    r.users.push_back(ref);
  }
  r.out = out.data();
  r.threads = threads;
  r.tile = tile;
  score(m, r);
  return out;
}

std::vector<float> run_encode(const Encoder& e, const std::vector<float>& x, int64_t n,
                              const std::vector<float>& queries, int threads) {
  const size_t kv = e.layers.size() * static_cast<size_t>(n) * e.d;
  const size_t qt = static_cast<size_t>(e.n_queries) * e.d;
  std::vector<float> out(2 * kv + qt + e.h1, NAN);  // k | v | qtokens | head_user
  EncodeRequest r;
  r.x = x.data();
  r.n = n;
  r.queries = queries.data();
  r.k = out.data();
  r.v = out.data() + kv;
  r.qtokens = out.data() + 2 * kv;
  r.head_user = out.data() + 2 * kv + qt;
  r.threads = threads;
  encode(e, r);
  return out;
}

// ---------------------------------------------------------------- comparison
struct Stat {
  std::string name;
  double tol = kTolF32, worst = 0, sum = 0;
  int64_t values = 0, bad = 0;
  int cases = 0;
  bool on = true;  // whether this path runs this check
};

int g_printed = 0;

void compare(Stat& st, const std::string& label, const std::vector<float>& got,
             const std::vector<float>& ref) {
  ++st.cases;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]) /
                       std::max(1.0, std::fabs(static_cast<double>(ref[i])));
    ++st.values;
    const bool ok = std::isfinite(got[i]) && err <= st.tol;
    if (std::isfinite(err)) {
      st.worst = std::max(st.worst, err);
      st.sum += err;
    }
    if (!ok) {
      ++st.bad;
      if (g_printed++ < 20)
        std::printf("MISMATCH %s %s [%zu]: %.8g vs generic %.8g (rel %.3g > %.0e)\n",
                    st.name.c_str(), label.c_str(), i, got[i], ref[i], err, st.tol);
    }
  }
}

struct Path {
  Isa isa;
  Stat f32, bf16, user;
  bool pairs;  // bf16 with dot products on bf16 pairs
};

const char* isa_str(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAmx: return "amx";
    case Isa::kNeon: return "neon";
    default: return "generic";
  }
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<Path> paths;
  auto add = [&](Isa isa, bool f32, bool bf16) {
    Path p;
    p.isa = isa;
    p.pairs = uses_pairs(isa, Precision::kBF16);
    const std::string n = isa_str(isa);
    p.f32.name = n + " fp32";
    p.bf16.name = n + (p.pairs ? " bf16 (dot products)" : " bf16 (storage)");
    p.bf16.tol = p.pairs ? kTolPairs : kTolF32;
    p.user.name = n + " user side";
    p.f32.on = f32;
    p.bf16.on = bf16;
    p.user.on = isa != Isa::kAmx;  // the user side is fp32: AMX runs it on AVX-512
    paths.push_back(p);
  };
  if (cpu_has_neon()) add(Isa::kNeon, true, true);
  if (cpu_has_avx2()) add(Isa::kAvx2, true, true);
  if (cpu_has_avx512()) add(Isa::kAvx512, true, cpu_has_avx512_bf16());
  if (cpu_has_amx_bf16()) add(Isa::kAmx, false, true);
  if (paths.empty()) {
    std::printf("parity: this CPU has no path besides generic; nothing to compare\n");
    return 0;
  }

  const int Ds[] = {16, 32, 64}, Ls[] = {1, 2, 3}, Hs[] = {1, 2, 4};
  const int64_t Ns[] = {0, 1, 17, 200}, Cs[] = {1, 7, 100, 300};
  const std::vector<int> heads_of[] = {{24, 8}, {16}, {32, 16, 8}};
  int idx = 0;
  for (int id = 0; id < 3; ++id)
    for (int il = 0; il < 3; ++il)
      for (int in = 0; in < 4; ++in, ++idx) {
        const int d = Ds[id], L = Ls[il], H = Hs[(id + il + 2 * in) % 3];
        const int64_t n = Ns[in], C = Cs[(id + il + in) % 4];
        const int threads = 1 + idx % 3, tile = idx % 2 ? 7 : 48;
        Rng g(1000 + idx);
        const RawModel raw = raw_model(g, d, H, L, heads_of[idx % 3]);
        // every other case a second user, of another history length, in the same request
        std::vector<int64_t> ns{n}, counts{C};
        if (idx % 2) {
          ns.push_back(Ns[(in + 1) % 4]);
          counts.push_back(Cs[(in + 2) % 4]);
        }
        const Scenario sc = scenario(g, raw, ns, counts);
        char label[160];
        std::snprintf(label, sizeof label,
                      "case %d: d=%d heads=%d layers=%d n=%lld C=%lld users=%zu threads=%d "
                      "tile=%d", idx, d, H, L, static_cast<long long>(n),
                      static_cast<long long>(C), ns.size(), threads, tile);

        // candidate side, fp32
        const Model gen = make_model(raw, Isa::kGeneric, Precision::kF32);
        const std::vector<float> ref = run_score(gen, sc, DType::kF32, 1, 48);
        // bf16: the generic emulation (rounded operands) and fp32 products on rounded weights
        const Model gen16 = make_model(raw, Isa::kGeneric, Precision::kBF16);
        Model gen16_store = gen16;
        gen16_store.precision = Precision::kF32;
        const std::vector<float> ref16 = run_score(gen16, sc, DType::kBF16, 1, 48);
        const std::vector<float> ref16_store = run_score(gen16_store, sc, DType::kBF16, 1, 48);
        for (Path& p : paths) {
          if (p.f32.on)
            compare(p.f32, label, run_score(make_model(raw, p.isa, Precision::kF32), sc,
                                            DType::kF32, threads, tile), ref);
          if (p.bf16.on)
            compare(p.bf16, label, run_score(make_model(raw, p.isa, Precision::kBF16), sc,
                                             DType::kBF16, threads, tile),
                    p.pairs ? ref16 : ref16_store);
        }

        // user side (fp32): histories of the case, and one long enough for the threaded path
        const int64_t nu = idx == 5 ? 400 : n;
        const int nq = idx % 3 == 0 ? 0 : 1 + idx % 4;
        Encoder enc = make_encoder(g, d, H, L, nq, nq ? 1 + idx % 2 : 0, heads_of[idx % 3][0]);
        const std::vector<float> x =
            g.vec(static_cast<size_t>(std::max<int64_t>(nu, 1)) * d, 1.0f);
        const std::vector<float> queries = g.vec(static_cast<size_t>(std::max(nq, 1)) * d, 1.0f);
        enc.isa = Isa::kGeneric;
        const std::vector<float> uref = run_encode(enc, x, nu, queries, 1);
        char ulabel[160];
        std::snprintf(ulabel, sizeof ulabel,
                      "case %d: d=%d heads=%d layers=%d n=%lld queries=%d threads=%d", idx, d, H,
                      L, static_cast<long long>(nu), nq, threads);
        for (Path& p : paths) {
          if (!p.user.on) continue;
          enc.isa = p.isa;
          compare(p.user, ulabel, run_encode(enc, x, nu, queries, threads), uref);
        }
      }

  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  bool ok = true;
  std::string summary;
  for (const Path& p : paths)
    for (const Stat* st : {&p.f32, &p.bf16, &p.user}) {
      if (!st->on) continue;
      ok = ok && st->bad == 0;
      std::printf("%-26s %2d cases %8lld values: rel diff max %.2e mean %.1e (tol %.0e)%s\n",
                  st->name.c_str(), st->cases, static_cast<long long>(st->values), st->worst,
                  st->sum / std::max<int64_t>(st->values, 1), st->tol,
                  st->bad ? "  FAILED" : "");
      char part[96];
      std::snprintf(part, sizeof part, "%s%s %.1e", summary.empty() ? "" : ", ", st->name.c_str(),
                    st->worst);
      summary += part;
    }
  std::printf("parity %s: %d shapes against generic in %.1f s (max rel diff: %s)\n",
              ok ? "OK" : "FAILED", idx, secs, summary.c_str());
  return ok ? 0 : 1;
}
