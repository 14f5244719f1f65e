// Unit tests of the CPU LoRA merge kernel (run by ctest): against an oracle
// written from the contract in csrc/cpu/lora.h (float32 accumulation in j
// order, one rounding of W + D from double), for every W dtype, strided
// factors (fan_in_fan_out), odd sizes and more than one column tile; and
// merge followed by unmerge stays within half an ulp of the merged value
// plus half an ulp of W; and the rounding of W +/- D pair by pair (below).
#include "check.h"
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../common/float_types.h"
#include "../cpu/lora.h"

using namespace llmopt_ext;


template <class T>
static void run_case(DType dt, int64_t rows, int64_t cols, int64_t r, bool transposed, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd;
  std::vector<T> w(rows * cols);
  for (auto& v : w) v = store<T>(nd(gen));
  // P (rows x r) and Q (r x cols) as float32; `transposed` stores them the way the
  // glue passes a fan_in_fan_out weight (P = A^T, Q = B^T: column-major views).
  std::vector<float> p(rows * r), q(r * cols);
  for (auto& v : p) v = nd(gen) * 0.3f;
  for (auto& v : q) v = nd(gen) * 0.3f;
  int64_t p_rs = r, p_cs = 1, q_rs = cols, q_cs = 1;
  std::vector<float> ps = p, qs = q;
  if (transposed) {  // same values, column-major storage
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < r; ++j) ps[j * rows + i] = p[i * r + j];
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < cols; ++c) qs[c * r + j] = q[j * cols + c];
    p_rs = 1; p_cs = rows; q_rs = 1; q_cs = r;
  }
  const float s = 0.625f;
  std::vector<T> merged = w;
  cpu::LoraMergeArgs a{dt, merged.data(), rows, cols, cols, DType::Float32, ps.data(), p_rs, p_cs,
                       qs.data(), q_rs, q_cs, r, s};
  cpu::lora_merge(a, +1);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < cols; ++c) {
      float acc = 0.0f;
      for (int64_t j = 0; j < r; ++j) {
        volatile float prod = p[i * r + j] * q[j * cols + c];  // no contraction
        acc = acc + prod;
      }
      volatile float d = s * acc;
      const T want = store<T>(load(w[i * cols + c]) + static_cast<double>(d));
      CHECK(std::memcmp(&want, &merged[i * cols + c], sizeof(T)) == 0,
            "%s %ldx%ld r=%ld t=%d (%ld,%ld): got %.9g want %.9g", dtype_name(dt), (long)rows,
            (long)cols, (long)r, (int)transposed, (long)i, (long)c, load(merged[i * cols + c]),
            load(want));
    }
  std::vector<T> back = merged;
  a.w = back.data();
  cpu::lora_merge(a, -1);
  const double eps = dt == DType::Float32 ? 0x1p-24 : dt == DType::BFloat16 ? 0x1p-8 : 0x1p-11;
  for (int64_t e = 0; e < rows * cols; ++e) {
    const double w0 = load(w[e]), m = load(merged[e]), u = load(back[e]);
    const double bound = eps * (std::fabs(m) + std::fabs(w0)) * 2.0 + 1e-7;  // ~half ulps
    CHECK(std::fabs(u - w0) <= bound, "unmerge error %.3g > %.3g", std::fabs(u - w0), bound);
  }
}

// ---- the rounding of W +/- D, pair by pair ------------------------------------
//
// The kernel rounds W +/- D in float32 (csrc/cpu/lora.cpp, "W +/- D rounded
// once"); these cases pin it to the double-based contract where a float32
// shortcut would go wrong: sums landing exactly on a bf16/fp16 midpoint with a
// nonzero error of either sign; a double that collapses onto a midpoint
// (w = 2^-70, d = 1 + 2^-8: the contract rounds to even, the exact sum does not);
// fp16 subnormal midpoints; powers of two; overflow; inf/NaN; plus every bf16/fp16
// bit pattern of W against random D.

static float f32_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

template <class T>
static uint32_t raw(const T& t) { if constexpr (sizeof(T) == 4) return bits_of(t); else return t.bits; }

// W[k] +/- D[k] through lora_merge. Finite D: 4 rows x n/4 columns, rank 4,
// P = identity and Q[j, c] = D[j * cols + c], so acc = D exactly and the 4-row
// micro-kernels run. Any D (inf/NaN too): one row, rank 1, P = 1, Q = D.
template <class T>
static void check_pairs(DType dt, const std::vector<T>& w, const std::vector<float>& d, bool one_row,
                        const char* what) {
  const int64_t n = static_cast<int64_t>(w.size());
  const int64_t rows = one_row ? 1 : 4, r = rows, cols = (n + rows - 1) / rows;
  std::vector<T> wm(rows * cols, store<T>(0.0));
  std::vector<float> q(r * cols, 0.0f), p(rows * r, 0.0f), dd(rows * cols, 0.0f);
  for (int64_t k = 0; k < n; ++k) { wm[k] = w[k]; q[k] = d[k]; }
  for (int64_t i = 0; i < rows; ++i) p[i * r + i] = 1.0f;
  for (int64_t i = 0; i < rows; ++i)  // the contract's D for each element
    for (int64_t c = 0; c < cols; ++c) {
      float acc = 0.0f;
      for (int64_t j = 0; j < r; ++j) {
        volatile float prod = p[i * r + j] * q[j * cols + c];
        acc = acc + prod;
      }
      volatile float dv = 1.0f * acc;
      dd[i * cols + c] = dv;
    }
  for (int sign : {1, -1}) {
    std::vector<T> got = wm;
    cpu::LoraMergeArgs a{dt, got.data(), rows, cols, cols, DType::Float32, p.data(), r, 1,
                         q.data(), cols, 1, r, 1.0f};
    cpu::lora_merge(a, sign);
    for (int64_t k = 0; k < rows * cols; ++k) {
      const T want = store<T>(load(wm[k]) + sign * static_cast<double>(dd[k]));
      CHECK(raw(want) == raw(got[k]), "%s %s sign=%d: w=%a d=%a: got 0x%x want 0x%x", dtype_name(dt),
            what, sign, load(wm[k]), static_cast<double>(dd[k]), raw(got[k]), raw(want));
    }
  }
}

// bf16/fp16 values next to the midpoint m = w + half an ulp of T (or its
// negative): d = (m - w) +/- 2^-k, so that s = float32(w + d) is m with a
// nonzero error of either sign (k large), or lands next to it.
template <class T>
static void midpoint_cases(DType dt, unsigned seed) {
  std::mt19937 gen(seed);
  const int drop = dt == DType::BFloat16 ? 16 : 13;  // float32 bits below T's last bit
  std::vector<T> w1, w4;
  std::vector<float> d1, d4;
  auto add = [&](T w, float d) {
    if (std::isfinite(load(w)) && std::isfinite(d)) { w4.push_back(w); d4.push_back(d); }
    w1.push_back(w);
    d1.push_back(d);
  };
  for (int rep = 0; rep < 4000; ++rep) {
    T w;
    w.bits = static_cast<uint16_t>(gen());
    const double wv = load(w);
    if (!std::isfinite(wv) || wv == 0.0) continue;
    const uint32_t wb = bits_of(static_cast<float>(wv));
    if ((wb & 0x7f800000u) == 0) continue;  // float32-subnormal W: below
    for (int up = 0; up < 2; ++up) {
      // the midpoint next to w, above or below in magnitude (same binade)
      const uint32_t mb = up ? wb + (1u << (drop - 1)) : wb - (1u << (drop - 1));
      const double half = static_cast<double>(f32_of(mb)) - wv;
      for (int k = 18; k <= 40; k += 11) {
        const double t = std::ldexp(std::fabs(wv), -k - drop + 16 - 8);
        add(w, static_cast<float>(half + t));
        add(w, static_cast<float>(half - t));
      }
      add(w, static_cast<float>(half));  // exactly on the midpoint
    }
  }
  // a tiny W next to a D that is exactly a midpoint (+/- 1 float32 ulp): the
  // double rounds onto (or next to) the midpoint
  const float mids[] = {1.00390625f, -1.01171875f, 3.0078125f, -0x1.018p+100f, 0x1.008p-100f,
                        1.0009765625f, -1.0029296875f, 0x1.002p+14f, 0x1.006p-10f};
  const double tiny[] = {0x1p-70, -0x1p-70, 0x1p-100, -0x1.8p-90, 0x1p-126, -0x1p-133, 0x1p-24, 0x1.4p-20};
  for (float m : mids)
    for (double t : tiny)
      for (int k = -1; k <= 1; ++k) {
        const float d = f32_of(bits_of(m) + k);
        add(store<T>(t * std::fabs(static_cast<double>(m))), d);
        add(store<T>(t), d);
      }
  // powers of two with D a little toward zero; fp16 subnormal midpoints
  for (int e = -30; e <= 15; ++e) {
    const double pw = std::ldexp(1.0, e);
    for (double frac : {0x1p-53, 0x1.8p-54, 0x1p-54, 0x1p-30, 0x1p-9, 0x1p-12}) {
      add(store<T>(pw), static_cast<float>(-pw * frac));
      add(store<T>(-pw), static_cast<float>(pw * frac));
    }
  }
  for (int k = 0; k < 64; ++k) {
    const double wv = k * 0x1p-24;  // fp16 subnormals (bf16: rounded)
    for (double t : {0.0, 0x1p-40, -0x1p-40, 0x1p-30, -0x1p-30}) add(store<T>(wv), static_cast<float>(0x1p-25 + t));
  }
  // overflow, inf, NaN, zeros
  const float sp[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 3.0e38f, -3.0e38f, 3.4028235e38f, 1e-45f,
                      65504.0f, 16.0f, 15.999f, 16.001f, 0x1p-25f, -0x1p-24f};
  for (float x : sp)
    for (float y : sp)
      if (!(std::isnan(x) && std::isnan(y))) add(store<T>(x), y);  // one NaN: its payload survives
  check_pairs(dt, w4, d4, false, "midpoints (4 rows)");
  check_pairs(dt, w1, d1, true, "midpoints (1 row)");
}

// Every bit pattern of a 16-bit W against random D of a similar scale and of
// random bits (both NaN: skipped, which NaN survives is not part of the contract).
template <class T>
static void all_bits_cases(DType dt, unsigned seed) {
  std::mt19937 gen(seed);
  std::vector<T> w;
  std::vector<float> d;
  for (uint32_t b = 0; b < 65536; ++b)
    for (int rep = 0; rep < 2; ++rep) {
      T t;
      t.bits = static_cast<uint16_t>(b);
      const double wv = load(t);
      float dv = f32_of(gen());
      if (rep == 0 && std::isfinite(wv) && wv != 0.0)
        dv = static_cast<float>(std::ldexp(wv, static_cast<int>(gen() % 32) - 24) *
                                (static_cast<int>(gen() % 2001) - 1000) * 1e-3);
      if (std::isnan(wv) && std::isnan(dv)) dv = 1.0f;
      w.push_back(t);
      d.push_back(dv);
    }
  check_pairs(dt, w, d, true, "all bit patterns");
}

static void float32_cases(unsigned seed) {
  std::mt19937 gen(seed);
  std::vector<float> w, d;
  for (int k = 0; k < 200000; ++k) {
    float wv = f32_of(gen()), dv = f32_of(gen());
    if (k % 2 && std::isfinite(wv)) dv = std::ldexp(wv, -static_cast<int>(gen() % 30)) * ((gen() % 2) ? 1.0f : -1.0f) *
                                        (1.0f + static_cast<float>(gen() % 4096) * 0x1p-12f);
    if (std::isnan(wv) && std::isnan(dv)) dv = 1.0f;
    w.push_back(wv);
    d.push_back(dv);
  }
  for (float x : {0.0f, -0.0f, INFINITY, -INFINITY, 3.4028235e38f, 1e-45f})
    for (float y : {0.0f, -0.0f, INFINITY, -INFINITY, 3.4028235e38f, -1e-45f}) { w.push_back(x); d.push_back(y); }
  check_pairs(DType::Float32, w, d, true, "random bits");
}

int main() {
  const int64_t shapes[][3] = {{1, 1, 1}, {7, 5, 3}, {33, 4100, 16}, {300, 257, 64}};
  unsigned seed = 1;
  for (const auto& sh : shapes)
    for (int t = 0; t < 2; ++t) {
      run_case<float>(DType::Float32, sh[0], sh[1], sh[2], t, seed++);
      run_case<bf16>(DType::BFloat16, sh[0], sh[1], sh[2], t, seed++);
      run_case<fp16>(DType::Float16, sh[0], sh[1], sh[2], t, seed++);
    }
  midpoint_cases<bf16>(DType::BFloat16, 101);
  midpoint_cases<fp16>(DType::Float16, 102);
  all_bits_cases<bf16>(DType::BFloat16, 103);
  all_bits_cases<fp16>(DType::Float16, 104);
  float32_cases(105);
  return llmopt_test::finish("test_lora_cpu");
}
