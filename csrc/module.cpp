// srp4ctr._C: the C++ CPU scoring path (pybind11).
//
//   tower = _C.Tower(d_model, n_heads, layers, head_zn, rest, h1, precision, isa, ln_eps)
//   tower.score(ids, (z0, q0, hz0), [(k, v, head_user), ...], counts, out, threads, tile)
//
// Weights arrive as float32 numpy arrays in nn.Linear layout and are packed once (model.cpp).
// Per request every buffer is a typed numpy array (no raw addresses): dtype, shape against the
// model, contiguity, id ranges and the caches' finiteness are checked here before any work, so
// no call from Python can make the kernels read or write outside its arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "tower.h"

namespace py = pybind11;
using srp4ctr::DType;
using srp4ctr::Isa;
using srp4ctr::Model;
using srp4ctr::Packed;
using srp4ctr::Precision;

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::vector<float> vec(const F32Array& a, py::ssize_t n, const char* what) {
  if (a.ndim() != 1 || a.shape(0) != n)
    throw std::invalid_argument(std::string(what) + ": expected shape [" + std::to_string(n) + "]");
  return std::vector<float>(a.data(), a.data() + n);
}

// nn.Linear weight W [N, K] -> GEMM operand B[k][n] (shape checked).
Packed pack(const F32Array& w, py::ssize_t n_out, py::ssize_t k_in, bool pairs, bool round,
            const char* what) {
  if (w.ndim() != 2 || w.shape(0) != n_out || w.shape(1) != k_in)
    throw std::invalid_argument(std::string(what) + ": expected shape [" + std::to_string(n_out) +
                                ", " + std::to_string(k_in) + "], got a different one");
  return srp4ctr::pack_weight(w.data(), static_cast<int>(n_out), static_cast<int>(k_in), pairs,
                              round);
}

// The instruction set of a model: the one asked for (checked against the CPU), or with "auto"
// the fastest this CPU has for the precision (x86: AMX > AVX-512 > AVX2 > generic; bf16 products
// on AVX-512 need AVX512-BF16, else bf16 runs as rounded fp32 on AVX2; aarch64: NEON, whose bf16
// uses BFDOT where the CPU has it and is a storage format otherwise).
Isa pick_isa(const std::string& isa, Precision prec) {
  const bool avx2 = srp4ctr::cpu_has_avx2();
  const bool avx512 = srp4ctr::cpu_has_avx512();
  const bool bf16 = srp4ctr::cpu_has_avx512_bf16();
  if (isa == "generic") return Isa::kGeneric;
  if (isa == "neon") {
    if (!srp4ctr::cpu_has_neon())
      throw std::runtime_error("isa='neon': this is not an aarch64 build");
    return Isa::kNeon;
  }
  if (isa == "avx2") {
    if (!avx2) throw std::runtime_error("isa='avx2': this CPU has no AVX2 + FMA");
    return Isa::kAvx2;
  }
  if (isa == "avx512") {
    if (!avx512) throw std::runtime_error("isa='avx512': this CPU has no AVX-512 (F/BW/VL/DQ)");
    if (prec == Precision::kBF16 && !bf16)
      throw std::runtime_error("isa='avx512' with bf16 needs AVX512-BF16, which this CPU lacks");
    return Isa::kAvx512;
  }
  if (isa == "amx") {
    if (prec != Precision::kBF16)
      throw std::invalid_argument("isa='amx' computes in bf16; fp32 runs on 'avx512'");
    if (!srp4ctr::cpu_has_amx_bf16())
      throw std::runtime_error("isa='amx': this CPU (or its OS) offers no AMX-BF16");
    return Isa::kAmx;
  }
  if (isa != "auto")
    throw std::invalid_argument(
        "isa must be 'auto', 'amx', 'avx512', 'avx2', 'neon' or 'generic'");
  if (avx512 && prec == Precision::kBF16 && srp4ctr::cpu_has_amx_bf16()) return Isa::kAmx;
  if (avx512 && (prec == Precision::kF32 || bf16)) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
  return srp4ctr::cpu_has_neon() ? Isa::kNeon : Isa::kGeneric;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kNeon: return "neon";
    default: return "generic";
  }
}

class Tower {
 public:
  Tower(int d_model, int n_heads, const py::list& layers, py::object head_zn,
        const py::list& rest, int h1, const std::string& precision, const std::string& isa,
        float ln_eps) {
    if (d_model <= 0 || n_heads <= 0 || d_model % n_heads)
      throw std::invalid_argument("d_model must be a positive multiple of n_heads");
    if (h1 <= 0) throw std::invalid_argument("h1 must be positive");
    if (!(ln_eps > 0.f) || !std::isfinite(ln_eps))
      throw std::invalid_argument("ln_eps must be a positive finite number");
    m_.eps = ln_eps;
    if (precision != "fp32" && precision != "bf16")
      throw std::invalid_argument("precision must be 'fp32' or 'bf16'");
    m_.d = d_model;
    m_.heads = n_heads;
    m_.head_dim = d_model / n_heads;
    m_.h1 = h1;
    m_.precision = precision == "bf16" ? Precision::kBF16 : Precision::kF32;
    m_.isa = pick_isa(isa, m_.precision);
    // bf16 pair operands for the bf16 dot-product units (AVX512-BF16, AMX, NEON BFDOT); AVX2,
    // NEON without BFDOT and the portable path multiply bf16-rounded fp32 operands
    const bool pairs = srp4ctr::uses_pairs(m_.isa, m_.precision);
    const bool round = m_.precision == Precision::kBF16;
    const int d = d_model;
    for (auto item : layers) {
      auto L = item.cast<py::dict>();
      auto get = [&](const char* k) { return L[k].cast<F32Array>(); };
      F32Array w1 = get("w1");
      if (w1.ndim() != 2 || w1.shape(1) != d) throw std::invalid_argument("w1: expected [F, d]");
      const py::ssize_t F = w1.shape(0);
      if (m_.ffn && m_.ffn != F) throw std::invalid_argument("every layer needs the same FFN width");
      m_.ffn = static_cast<int>(F);
      srp4ctr::LayerWeights lw;
      lw.ln1_w = vec(get("ln1_w"), d, "ln1_w");
      lw.ln1_b = vec(get("ln1_b"), d, "ln1_b");
      lw.bq = vec(get("bq"), d, "bq");
      lw.bo = vec(get("bo"), d, "bo");
      lw.ln2_w = vec(get("ln2_w"), d, "ln2_w");
      lw.ln2_b = vec(get("ln2_b"), d, "ln2_b");
      lw.b1 = vec(get("b1"), F, "b1");
      lw.b2 = vec(get("b2"), d, "b2");
      lw.wq = pack(get("wq"), d, d, pairs, round, "wq");
      lw.wo = pack(get("wo"), d, d, pairs, round, "wo");
      lw.w1 = pack(w1, F, d, pairs, round, "w1");
      lw.w2 = pack(get("w2"), d, F, pairs, round, "w2");
      m_.layers.push_back(std::move(lw));
    }
    if (!m_.layers.empty()) {
      if (head_zn.is_none()) throw std::invalid_argument("head_zn is required with tower layers");
      m_.head_zn = pack(head_zn.cast<F32Array>(), h1, d, pairs, round, "head_zn");
    }
    int width = h1;
    for (auto item : rest) {
      auto t = item.cast<py::tuple>();
      F32Array w = t[0].cast<F32Array>();
      if (w.ndim() != 2 || w.shape(1) != width)
        throw std::invalid_argument("rest: each head layer's input must be the previous output");
      const py::ssize_t out = w.shape(0);
      m_.rest.push_back(pack(w, out, width, pairs, round, "rest weight"));
      m_.rest_b.push_back(vec(t[1].cast<F32Array>(), out, "rest bias"));
      width = static_cast<int>(out);
    }
    if (width != 1) throw std::invalid_argument("the head must end in one output (the logit)");
  }

  // Every buffer arrives as a typed numpy array (float32, or the bit patterns of bfloat16 as
  // uint16 / int16) and is checked here before any loop: dtype, rank, shape against the model,
  // C-contiguity, writability of `out`, the counts against the ids, every id against the
  // tables' rows, and the caches' values (NaN / inf never become a plausible probability).
  //   ids     int64 [N]                   rows of the tables
  //   tables  (z0 [R, d], q0 [R, d] | None, hz0 [R, h1]), one dtype
  //   users   [(k [NL, n, H, Dh], v [NL, n, H, Dh], head_user [h1]), ...], one dtype
  //   counts  int64 [B]                   candidates of each user, in order; they sum to N
  //   out     float32 [N]                 logits (written)
  void score(const py::array& ids, const py::tuple& tables, const py::list& users,
             const py::array& counts, py::array out, int threads, int tile) {
    srp4ctr::Request r;
    if (tile < 1 || tile > 1024) throw std::invalid_argument("tile must be in [1, 1024]");
    r.tile = tile;
    r.threads = std::max(1, threads);
    const int64_t n_ids = checked(ids, "ids", kI64, {-1});
    r.ids = static_cast<const int64_t*>(ids.data());
    checked(out, "out", kOut, {n_ids});
    if (!out.writeable()) throw std::invalid_argument("out: not writable");
    r.out = static_cast<float*>(out.mutable_data());
    if (tables.size() != 3) throw std::invalid_argument("tables: (z0, q0 or None, hz0)");
    const bool layers = !m_.layers.empty();
    const py::array z0 = as_array(tables[0], "z0");
    const py::array hz0 = as_array(tables[2], "hz0");
    r.table_dtype = float_dtype(z0, "z0");
    const int64_t rows = checked(z0, "z0", static_cast<int>(r.table_dtype), {-1, m_.d});
    checked(hz0, "hz0", static_cast<int>(r.table_dtype), {rows, m_.h1});
    r.z0 = z0.data();
    r.hz0 = hz0.data();
    r.n_rows = rows;
    py::array q0;
    if (layers) {
      if (tables[1].is_none()) throw std::invalid_argument("q0: required with tower layers");
      q0 = as_array(tables[1], "q0");
      checked(q0, "q0", static_cast<int>(r.table_dtype), {rows, m_.d});
      r.q0 = q0.data();
    }
    const int64_t n_users = checked(counts, "counts", kI64, {-1});
    if (static_cast<int64_t>(users.size()) != n_users)
      throw std::invalid_argument("users: " + std::to_string(users.size()) + " caches but " +
                                  std::to_string(n_users) + " counts");
    const int64_t* cnt = static_cast<const int64_t*>(counts.data());
    std::vector<py::array> keep;  // the arrays of every user, alive for the call
    keep.reserve(3 * users.size());
    int64_t total = 0;
    const int64_t nl = static_cast<int64_t>(m_.layers.size());
    for (int64_t b = 0; b < n_users; ++b) {
      auto t = users[b].cast<py::tuple>();
      if (t.size() != 3) throw std::invalid_argument("users: each entry is (k, v, head_user)");
      const std::string who = "users[" + std::to_string(b) + "].";
      py::array k = as_array(t[0], (who + "k").c_str());
      py::array v = as_array(t[1], (who + "v").c_str());
      py::array hu = as_array(t[2], (who + "head_user").c_str());
      const DType kd = float_dtype(k, (who + "k").c_str());
      if (b == 0) r.kv_dtype = kd;
      if (kd != r.kv_dtype) throw std::invalid_argument(who + "k: another dtype than users[0]");
      const int64_t n = k.ndim() == 4 ? k.shape(1) : -1;
      checked(k, (who + "k").c_str(), static_cast<int>(kd), {nl, -1, m_.heads, m_.head_dim});
      checked(v, (who + "v").c_str(), static_cast<int>(kd), {nl, n, m_.heads, m_.head_dim});
      checked(hu, (who + "head_user").c_str(), static_cast<int>(kd), {m_.h1});
      if (cnt[b] < 0) throw std::invalid_argument("counts: negative");
      finite(k, kd, (who + "k").c_str());
      finite(v, kd, (who + "v").c_str());
      finite(hu, kd, (who + "head_user").c_str());
      srp4ctr::UserRef ref;
      ref.k = k.data();
      ref.v = v.data();
      ref.head_user = hu.data();
      ref.n = n;
      ref.count = cnt[b];
      total += ref.count;
      r.users.push_back(ref);
      keep.push_back(std::move(k));
      keep.push_back(std::move(v));
      keep.push_back(std::move(hu));
    }
    if (total != n_ids)
      throw std::invalid_argument("counts: they add up to " + std::to_string(total) + ", not to " +
                                  std::to_string(n_ids) + " ids");
    for (int64_t i = 0; i < n_ids; ++i)
      if (r.ids[i] < 0 || r.ids[i] >= r.n_rows)
        throw std::out_of_range("ids: row " + std::to_string(r.ids[i]) + " outside the tables' " +
                                std::to_string(r.n_rows));
    if (n_ids == 0) return;
    py::gil_scoped_release nogil;
    srp4ctr::score(m_, r);
  }

  std::string isa() const { return isa_name(m_.isa); }
  std::string precision() const { return m_.precision == Precision::kBF16 ? "bf16" : "fp32"; }

 private:
  // what `checked` expects of an array besides a float table dtype
  static constexpr int kI64 = 100, kOut = 101;

  static py::array as_array(const py::handle& h, const char* what) {
    if (!py::isinstance<py::array>(h))
      throw std::invalid_argument(std::string(what) + ": expected a numpy array, got " +
                                  std::string(py::str(py::type::handle_of(h).attr("__name__"))));
    return py::reinterpret_borrow<py::array>(h);
  }

  // float32 -> fp32; 2-byte integers -> the bit patterns of bfloat16
  static DType float_dtype(const py::array& a, const char* what) {
    const py::dtype dt = a.dtype();
    if (dt.is(py::dtype::of<float>())) return DType::kF32;
    if (dt.is(py::dtype::of<uint16_t>()) || dt.is(py::dtype::of<int16_t>())) return DType::kBF16;
    throw std::invalid_argument(std::string(what) + ": dtype " + std::string(py::str(dt)) +
                                ", expected float32 or bfloat16 bits (uint16)");
  }

  // Checks dtype (a DType, or kI64 / kOut), C-contiguity and the shape (-1: any; the first
  // such dimension's size is returned, else the first dimension's).
  static int64_t checked(const py::array& a, const char* what, int want,
                         std::initializer_list<int64_t> shape) {
    const py::dtype dt = a.dtype();
    const bool ok = want == kI64   ? dt.is(py::dtype::of<int64_t>())
                    : want == kOut ? dt.is(py::dtype::of<float>())
                                   : float_dtype(a, what) == static_cast<DType>(want);
    if (!ok)
      throw std::invalid_argument(std::string(what) + ": dtype " + std::string(py::str(dt)) +
                                  " is not the " +
                                  (want == kI64 ? "int64" : want == kOut ? "float32" : "tables'") +
                                  " one");
    if (a.ndim() != static_cast<py::ssize_t>(shape.size()))
      throw std::invalid_argument(std::string(what) + ": " + std::to_string(a.ndim()) +
                                  " dimensions, expected " + std::to_string(shape.size()));
    int64_t free = -1, i = 0;
    for (int64_t want_n : shape) {
      const int64_t got = a.shape(i);
      if (want_n >= 0 && got != want_n)
        throw std::invalid_argument(std::string(what) + ": dimension " + std::to_string(i) +
                                    " is " + std::to_string(got) + ", expected " +
                                    std::to_string(want_n));
      if (want_n < 0 && free < 0) free = got;
      ++i;
    }
    if (!(a.flags() & py::array::c_style))
      throw std::invalid_argument(std::string(what) + ": not C-contiguous");
    return free >= 0 ? free : (shape.size() ? a.shape(0) : 0);
  }

  static void finite(const py::array& a, DType dt, const char* what) {
    const py::ssize_t n = a.size();
    if (dt == DType::kF32) {
      const float* p = static_cast<const float*>(a.data());
      for (py::ssize_t i = 0; i < n; ++i)
        if (!std::isfinite(p[i])) throw std::invalid_argument(std::string(what) + ": NaN or inf");
    } else {
      const uint16_t* p = static_cast<const uint16_t*>(a.data());
      for (py::ssize_t i = 0; i < n; ++i)
        if ((p[i] & 0x7F80u) == 0x7F80u)  // bfloat16 exponent all ones: inf or NaN
          throw std::invalid_argument(std::string(what) + ": NaN or inf");
    }
  }

  Model m_;
};

// The user side of one model (fp32): FG-BERT layers, Q-Former, the head's user block.
class UserEncoder {
 public:
  UserEncoder(int d_model, int n_heads, const py::list& layers, const py::tuple& final_ln,
              const py::list& qblocks, py::object q_ln, py::object head_user, int n_queries,
              int h1, const std::string& isa, float ln_eps) {
    if (d_model <= 0 || n_heads <= 0 || d_model % n_heads)
      throw std::invalid_argument("d_model must be a positive multiple of n_heads");
    if (h1 <= 0 || n_queries < 0) throw std::invalid_argument("h1 > 0 and n_queries >= 0");
    if (!(ln_eps > 0.f) || !std::isfinite(ln_eps))
      throw std::invalid_argument("ln_eps must be a positive finite number");
    e_.eps = ln_eps;
    e_.d = d_model;
    e_.heads = n_heads;
    e_.head_dim = d_model / n_heads;
    e_.n_queries = n_queries;
    e_.h1 = h1;
    e_.isa = pick_isa(isa == "amx" ? std::string("avx512") : isa, Precision::kF32);
    const int d = d_model;
    auto get = [](const py::dict& D, const char* k) { return D[k].cast<F32Array>(); };
    auto attn = [&](const py::dict& D, const std::string& p) {
      srp4ctr::AttnWeights a;
      a.wq = pack(get(D, (p + "wq").c_str()), d, d, false, false, "wq");
      a.wk = pack(get(D, (p + "wk").c_str()), d, d, false, false, "wk");
      a.wv = pack(get(D, (p + "wv").c_str()), d, d, false, false, "wv");
      a.wo = pack(get(D, (p + "wo").c_str()), d, d, false, false, "wo");
      a.bq = vec(get(D, (p + "bq").c_str()), d, "bq");
      a.bk = vec(get(D, (p + "bk").c_str()), d, "bk");
      a.bv = vec(get(D, (p + "bv").c_str()), d, "bv");
      a.bo = vec(get(D, (p + "bo").c_str()), d, "bo");
      return a;
    };
    auto ffn = [&](const py::dict& D, Packed& w1, std::vector<float>& b1, Packed& w2,
                   std::vector<float>& b2) {
      F32Array a1 = get(D, "w1");
      if (a1.ndim() != 2 || a1.shape(1) != d) throw std::invalid_argument("w1: expected [F, d]");
      const py::ssize_t F = a1.shape(0);
      if (e_.ffn && e_.ffn != F) throw std::invalid_argument("every FFN needs the same width");
      e_.ffn = static_cast<int>(F);
      w1 = pack(a1, F, d, false, false, "w1");
      b1 = vec(get(D, "b1"), F, "b1");
      w2 = pack(get(D, "w2"), d, F, false, false, "w2");
      b2 = vec(get(D, "b2"), d, "b2");
    };
    auto ln = [&](const py::dict& D, const std::string& name, std::vector<float>& w,
                  std::vector<float>& b) {
      w = vec(get(D, (name + "_w").c_str()), d, (name + "_w").c_str());
      b = vec(get(D, (name + "_b").c_str()), d, (name + "_b").c_str());
    };
    for (auto item : layers) {
      auto D = item.cast<py::dict>();
      srp4ctr::EncLayerWeights w;
      ln(D, "ln1", w.ln1_w, w.ln1_b);
      ln(D, "ln2", w.ln2_w, w.ln2_b);
      w.attn = attn(D, "");
      ffn(D, w.w1, w.b1, w.w2, w.b2);
      e_.layers.push_back(std::move(w));
    }
    if (final_ln.size() != 2) throw std::invalid_argument("final_ln: (weight, bias)");
    e_.final_w = vec(final_ln[0].cast<F32Array>(), d, "final_ln weight");
    e_.final_b = vec(final_ln[1].cast<F32Array>(), d, "final_ln bias");
    for (auto item : qblocks) {
      auto D = item.cast<py::dict>();
      srp4ctr::QBlockWeights b;
      ln(D, "ln1", b.ln1_w, b.ln1_b);
      ln(D, "ln2", b.ln2_w, b.ln2_b);
      ln(D, "ln3", b.ln3_w, b.ln3_b);
      b.self_attn = attn(D, "self_");
      b.cross_attn = attn(D, "cross_");
      ffn(D, b.w1, b.b1, b.w2, b.b2);
      e_.qblocks.push_back(std::move(b));
    }
    if (n_queries) {
      if (q_ln.is_none() || head_user.is_none())
        throw std::invalid_argument("a Q-Former needs q_ln and head_user");
      auto ql = q_ln.cast<py::tuple>();
      e_.qln_w = vec(ql[0].cast<F32Array>(), d, "q_ln weight");
      e_.qln_b = vec(ql[1].cast<F32Array>(), d, "q_ln bias");
      auto hu = head_user.cast<py::tuple>();
      e_.head_user = pack(hu[0].cast<F32Array>(), h1, static_cast<py::ssize_t>(n_queries) * d,
                          false, false, "head_user");
      e_.head_b = vec(hu[1].cast<F32Array>(), h1, "head_user bias");
    } else {
      if (!qblocks.empty()) throw std::invalid_argument("Q-Former blocks without queries");
      if (head_user.is_none()) throw std::invalid_argument("head_user: (None, bias) needed");
      e_.head_b = vec(head_user.cast<py::tuple>()[1].cast<F32Array>(), h1, "head_user bias");
    }
  }

  // -> (k [L, n, d], v [L, n, d], qtokens [M, d], head_user [h1]), all float32.
  py::tuple encode(const F32Array& x, py::object queries, int threads) {
    const int d = e_.d, M = e_.n_queries, nl = static_cast<int>(e_.layers.size());
    if (x.ndim() != 2 || x.shape(1) != d) throw std::invalid_argument("x: expected [n, d_model]");
    const py::ssize_t n = x.shape(0);
    F32Array qa;
    if (M) {
      if (queries.is_none()) throw std::invalid_argument("queries: expected [n_queries, d]");
      qa = queries.cast<F32Array>();
      if (qa.ndim() != 2 || qa.shape(0) != M || qa.shape(1) != d)
        throw std::invalid_argument("queries: expected [n_queries, d_model]");
    }
    for (py::ssize_t i = 0; i < n * d; ++i)
      if (!std::isfinite(x.data()[i])) throw std::invalid_argument("x: not finite");
    for (py::ssize_t i = 0; M && i < static_cast<py::ssize_t>(M) * d; ++i)
      if (!std::isfinite(qa.data()[i])) throw std::invalid_argument("queries: not finite");
    F32Array k({static_cast<py::ssize_t>(nl), n, static_cast<py::ssize_t>(d)});
    F32Array v({static_cast<py::ssize_t>(nl), n, static_cast<py::ssize_t>(d)});
    F32Array qt({static_cast<py::ssize_t>(M), static_cast<py::ssize_t>(d)});
    F32Array hu({static_cast<py::ssize_t>(e_.h1)});
    srp4ctr::EncodeRequest r;
    r.x = x.data();
    r.n = n;
    r.queries = M ? qa.data() : nullptr;
    r.k = k.mutable_data();
    r.v = v.mutable_data();
    r.qtokens = qt.mutable_data();
    r.head_user = hu.mutable_data();
    r.threads = std::max(1, threads);
    {
      py::gil_scoped_release nogil;
      srp4ctr::encode(e_, r);
    }
    return py::make_tuple(k, v, qt, hu);
  }

  std::string isa() const { return isa_name(e_.isa); }

 private:
  srp4ctr::Encoder e_;
};

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "srp4ctr C++ CPU kernels: the folded candidate tower (fp32 / bf16)";
  py::class_<Tower>(mod, "Tower")
      .def(py::init<int, int, const py::list&, py::object, const py::list&, int,
                    const std::string&, const std::string&, float>(),
           py::arg("d_model"), py::arg("n_heads"), py::arg("layers"), py::arg("head_zn"),
           py::arg("rest"), py::arg("h1"), py::arg("precision"), py::arg("isa"),
           py::arg("ln_eps"))
      .def("score", &Tower::score, py::arg("ids"), py::arg("tables"), py::arg("users"),
           py::arg("counts"), py::arg("out"), py::arg("threads"), py::arg("tile"))
      .def_property_readonly("isa", &Tower::isa)
      .def_property_readonly("precision", &Tower::precision);
  py::class_<UserEncoder>(mod, "UserEncoder")
      .def(py::init<int, int, const py::list&, const py::tuple&, const py::list&, py::object,
                    py::object, int, int, const std::string&, float>(),
           py::arg("d_model"), py::arg("n_heads"), py::arg("layers"), py::arg("final_ln"),
           py::arg("qblocks"), py::arg("q_ln"), py::arg("head_user"), py::arg("n_queries"),
           py::arg("h1"), py::arg("isa"), py::arg("ln_eps"))
      .def("encode", &UserEncoder::encode, py::arg("x"), py::arg("queries"),
           py::arg("threads") = 1)
      .def_property_readonly("isa", &UserEncoder::isa);
  mod.def("cpu_features", [] {
    py::dict d;
    d["avx2"] = srp4ctr::cpu_has_avx2();
    d["avx512"] = srp4ctr::cpu_has_avx512();
    d["avx512_bf16"] = srp4ctr::cpu_has_avx512_bf16();
    d["amx_bf16"] = srp4ctr::cpu_has_amx_bf16();
    d["neon"] = srp4ctr::cpu_has_neon();
    d["neon_bf16"] = srp4ctr::cpu_has_neon_bf16();
    return d;
  });
}
