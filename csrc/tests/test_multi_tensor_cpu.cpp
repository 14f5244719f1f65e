// Unit tests of the torch-free CPU kernel library (run by ctest).
//
// Rounding helpers are checked exhaustively (fp16/bf16 round trips) and on the
// double-rounding traps round-to-odd exists for; the multi-tensor ops are
// checked against long-double loops written independently of the kernels.
#include "check.h"
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <cstdlib>
#include <random>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/float_types.h"
#include "../cpu/multi_tensor.h"

using namespace llmopt_ext;


// ---- independent oracles -------------------------------------------------

// Value of a bf16 / fp16 bit pattern, decoded from the IEEE definition.
static long double decode(uint16_t bits, int mant_bits, int bias) {
  const int exp_bits = 15 - mant_bits;
  const int e = (bits >> mant_bits) & ((1 << exp_bits) - 1);
  const int m = bits & ((1 << mant_bits) - 1);
  const long double sign = (bits & 0x8000) ? -1.0L : 1.0L;
  if (e == (1 << exp_bits) - 1) return m ? NAN : sign * INFINITY;
  if (e == 0) return sign * std::ldexp((long double)m, 1 - bias - mant_bits);
  return sign * std::ldexp((long double)(m | (1 << mant_bits)), e - bias - mant_bits);
}

// Correct RNE rounding of d to a 16-bit format, by search over the two
// neighbours of a brute-force scan (monotone bit patterns per sign).
static uint16_t round_exact(double d, int mant_bits, int bias) {
  const uint16_t sign = std::signbit(d) ? 0x8000 : 0;
  const long double a = std::fabs((long double)d);
  // largest finite magnitude pattern
  const uint16_t max_finite = (uint16_t)(((((1 << (15 - mant_bits)) - 1) - 1) << mant_bits) | ((1 << mant_bits) - 1));
  // binary search for the largest pattern with value <= a
  int lo = 0, hi = max_finite;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (decode((uint16_t)mid, mant_bits, bias) <= a) lo = mid; else hi = mid - 1;
  }
  const long double vlo = decode((uint16_t)lo, mant_bits, bias);
  if (vlo == a) return sign | lo;
  long double vhi;
  if (lo == max_finite) {  // overflow threshold: halfway to the next power of two
    vhi = std::ldexp(1.0L, (1 << (14 - mant_bits)));
  } else {
    vhi = decode((uint16_t)(lo + 1), mant_bits, bias);
  }
  const long double dlo = a - vlo, dhi = vhi - a;
  int pick;
  if (dlo < dhi) pick = lo;
  else if (dhi < dlo) pick = lo + 1;
  else pick = (lo & 1) ? lo + 1 : lo;
  if (pick > max_finite) return sign | (uint16_t)(max_finite + 1);  // inf
  return sign | (uint16_t)pick;
}

static void test_roundtrips() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const double vh = load(fp16{(uint16_t)h});
    const long double want = decode((uint16_t)h, 10, 15);
    if (std::isnan(want)) {
      CHECK(std::isnan(vh), "fp16 %04x should decode to NaN", h);
      CHECK(std::isnan(load(store<fp16>(vh))), "fp16 NaN %04x must stay NaN", h);
      continue;
    }
    CHECK((long double)vh == want, "fp16 %04x decodes to %.17g", h, vh);
    // the portable bit-twiddling path too (load/store may use _Float16)
    CHECK((long double)detail::f16_to_f32((uint16_t)h) == want, "f16_to_f32(%04x)", h);
    CHECK(detail::f32_to_f16_rne(detail::f16_to_f32((uint16_t)h)) == h, "f32_to_f16_rne(%04x)", h);
    CHECK(store<fp16>(vh).bits == h, "fp16 %04x round trip", h);
    const double vb = load(bf16{(uint16_t)h});
    const long double wantb = decode((uint16_t)h, 7, 127);
    if (std::isnan(wantb)) continue;
    CHECK((long double)vb == wantb, "bf16 %04x decodes to %.17g", h, vb);
    CHECK(store<bf16>(vb).bits == h, "bf16 %04x round trip", h);
  }
}

static void test_single_rounding() {
  std::mt19937_64 rng(1234);
  int traps = 0;
  for (int it = 0; it < 200000; ++it) {
    // Random doubles over a wide range, plus midpoints of adjacent 16-bit
    // values nudged by less than float precision: rounding through float with
    // RNE would hit an exact tie there and could pick the wrong neighbour.
    const int kind = it % 3;
    for (int fmt = 0; fmt < 2; ++fmt) {
      const int mant = fmt ? 10 : 7, bias = fmt ? 15 : 127;
      double d;
      if (kind == 0) {
        const double m = std::uniform_real_distribution<double>(-2, 2)(rng);
        const int e = std::uniform_int_distribution<int>(fmt ? -26 : -130, fmt ? 17 : 128)(rng);
        d = std::ldexp(m, e);
      } else {
        const uint16_t b = (uint16_t)(rng() & 0x7bff);
        const long double v0 = decode(b, mant, bias), v1 = decode((uint16_t)(b + 1), mant, bias);
        if (std::isnan(v0) || std::isnan(v1) || std::isinf(v1)) continue;
        const double mid = (double)((v0 + v1) / 2);
        const double nudge = std::ldexp(std::fabs(mid), -40) * (kind == 1 ? 1 : -1);
        d = mid + nudge;
        ++traps;
      }
      const uint16_t want = round_exact(d, mant, bias);
      const uint16_t got = fmt ? store<fp16>(d).bits : store<bf16>(d).bits;
      CHECK(got == want, "%s(%.20g) = %04x, want %04x", fmt ? "fp16" : "bf16", d, got, want);
      if (fmt) {
        const uint16_t portable = detail::f32_to_f16_rne(detail::round_to_odd_f32(d));
        CHECK(portable == want, "portable fp16(%.20g) = %04x, want %04x", d, portable, want);
      }
    }
  }
  CHECK(traps > 1000, "too few midpoint cases (%d)", traps);
}

// The block converter of the bf16/fp16 kernels (cpu::round_doubles: AVX2 where
// the CPU has it) against the scalar store<T>, which is its specification: the
// same bits for every double, checked on every exponent, all 16-bit values,
// their midpoints (exact ties and one double ulp either side), subnormal results,
// overflow to Inf, Inf and NaN payloads, in blocks that mix special and ordinary
// lanes and lengths that leave scalar tails.
static uint64_t bits_of(double d) { uint64_t u; std::memcpy(&u, &d, 8); return u; }
static double from_bits(uint64_t u) { double d; std::memcpy(&d, &u, 8); return d; }

template <class T>
static void check_round_doubles(const std::vector<double>& in, const char* what) {
  const DType dt = std::is_same<T, bf16>::value ? DType::BFloat16 : DType::Float16;
  std::vector<T> out(in.size());
  // a few lengths and offsets: full 16-lane groups, partial tails, unaligned starts
  for (size_t off : {size_t(0), size_t(3)}) {
    if (off >= in.size()) continue;
    const int64_t n = (int64_t)(in.size() - off);
    cpu::round_doubles(dt, in.data() + off, out.data(), n);
    int fails = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t want = store<T>(in[off + i]).bits;
      if (out[i].bits != want && fails++ < 5)
        CHECK(false, "round_doubles %s %s: %.17g (%016llx) -> %04x, store gives %04x",
              dtype_name(dt), what, in[off + i], (unsigned long long)bits_of(in[off + i]),
              out[i].bits, want);
    }
    CHECK(fails == 0, "round_doubles %s %s: %d mismatches", dtype_name(dt), what, fails);
  }
}

static void test_round_doubles() {
  std::mt19937_64 rng(99);
  for (int fmt = 0; fmt < 2; ++fmt) {
    std::vector<double> v;
    // every 16-bit value, its midpoint with the next one, and one double ulp around both
    for (uint32_t h = 0; h < 65536; ++h) {
      const double a = fmt ? load(fp16{(uint16_t)h}) : load(bf16{(uint16_t)h});
      const double b = fmt ? load(fp16{(uint16_t)(h + 1)}) : load(bf16{(uint16_t)(h + 1)});
      v.push_back(a);
      v.push_back(std::nextafter(a, 0.0));
      v.push_back(std::nextafter(a, INFINITY));
      if ((h & 0x7fff) != 0x7fff && std::isfinite(a) && std::isfinite(b) && std::signbit(a) == std::signbit(b)) {
        const double mid = a + (b - a) / 2;  // exact: one more bit than the 16-bit format
        v.push_back(mid);
        v.push_back(std::nextafter(mid, 0.0));
        v.push_back(std::nextafter(mid, INFINITY));
        v.push_back(-mid);
      }
    }
    // the overflow threshold (halfway past the largest finite value) and around it
    const double maxf = fmt ? 65504.0 : (double)load(bf16{0x7f7f});
    const double thr = fmt ? 65520.0 : std::ldexp(2.0 - std::ldexp(1.0, -8), 127);
    for (double d : {maxf, thr, std::ldexp(1.0, fmt ? 16 : 128), std::ldexp(1.0, fmt ? 17 : 129),
                     DBL_MAX, (double)FLT_MAX, (double)INFINITY, 0.0, DBL_TRUE_MIN, DBL_MIN})
      for (double e : {d, std::nextafter(d, 0.0), std::nextafter(d, (double)INFINITY)}) {
        v.push_back(e);
        v.push_back(-e);
      }
    // NaNs: quiet and signalling payloads, both signs
    for (int k = 0; k < 2000; ++k)
      v.push_back(from_bits((rng() | 0x7ff0000000000000ull) & ((k & 1) ? ~0ull : ~(1ull << 63))));
    // random doubles of every exponent, with some low significand bits cleared (ties likelier)
    for (int k = 0; k < 400000; ++k) {
      uint64_t u = rng();
      const uint64_t e = rng() % 2048;
      u = (u & 0x800fffffffffffffull) | (e << 52);
      if (k & 1) u &= ~((1ull << (rng() % 53)) - 1);
      v.push_back(from_bits(u));
    }
    // random doubles near the format's range, where the cases are
    for (int k = 0; k < 400000; ++k) {
      const double m = std::uniform_real_distribution<double>(-2, 2)(rng);
      const int e = std::uniform_int_distribution<int>(fmt ? -30 : -140, fmt ? 18 : 130)(rng);
      v.push_back(std::ldexp(m, e));
    }
    // shuffled, so special lanes sit in blocks of ordinary ones
    std::shuffle(v.begin(), v.end(), rng);
    if (fmt) check_round_doubles<fp16>(v, "mixed");
    else check_round_doubles<bf16>(v, "mixed");
    // a run with no special values at all (the vector path throughout), odd length
    std::vector<double> w;
    for (int k = 0; k < 100003; ++k)
      w.push_back(std::ldexp(std::uniform_real_distribution<double>(-2, 2)(rng),
                             std::uniform_int_distribution<int>(fmt ? -26 : -134, fmt ? 14 : 126)(rng)));
    if (fmt) check_round_doubles<fp16>(w, "ordinary");
    else check_round_doubles<bf16>(w, "ordinary");
  }
}

// ---- multi-tensor ops ----------------------------------------------------

template <class T>
struct Lists {
  std::vector<std::vector<T>> data;
  std::vector<void*> ptrs;
  explicit Lists(const std::vector<int64_t>& numels, std::mt19937_64& rng, double scale = 1.0) {
    std::normal_distribution<double> nd(0.0, scale);
    for (int64_t n : numels) {
      std::vector<T> v((size_t)n);
      for (auto& e : v) e = store<T>(nd(rng));
      data.push_back(std::move(v));
    }
    for (auto& v : data) ptrs.push_back(v.data());
  }
  cpu::ConstList c() const { return {ptrs.data()}; }
  cpu::MutList m() { return {ptrs.data()}; }
  long double at(size_t t, size_t i) const { return load(data[t][i]); }
};

template <class T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::Float32; }
template <> DType dtype_of<bf16>() { return DType::BFloat16; }
template <> DType dtype_of<fp16>() { return DType::Float16; }

static bool close(long double got, long double want, long double abs_scale) {
  // double accumulation: the only error beyond the final fp32 rounding of the
  // result is ~n * 2^-53 relative to sum |terms|.
  return std::fabs(got - want) <= 1e-12L * abs_scale + 1e-300L;
}

// The long-double value `v` rounded once into T, as the kernels must store it.
template <class T> static T round_into(long double v) {
  return store<T>((double)v);  // exact inputs: the double value equals v up to 2^-53 rel.
}

// The fast path (exact == false, 16-bit storage), written out independently of
// csrc/common/multi_tensor_math.h: float32 operations one at a time (this file is
// built with -ffp-contract=off), then one RNE rounding into T.
template <class T> static T round_f32(float f);
template <> bf16 round_f32<bf16>(float f) { return bf16{detail::f32_to_bf16_rne(f)}; }
template <> fp16 round_f32<fp16>(float f) { return fp16{detail::f32_to_f16_rne(f)}; }
template <> float round_f32<float>(float f) { return f; }
static float f32(long double v) { return static_cast<float>(v); }  // exact for loaded values

// exact || float32 storage: the float64 formula; otherwise the float32 one.
template <class T> static bool f32_path(bool exact) { return !exact && !std::is_same_v<T, float>; }

template <class T> static long double want_axpby(bool exact, float a, long double x, float b, long double y) {
  if (!f32_path<T>(exact)) return load(round_into<T>((long double)a * x + (long double)b * y));
  const float ax = a * f32(x);
  const float by = b * f32(y);
  const float sum = ax + by;
  return load(round_f32<T>(sum));
}
template <class T> static long double want_update(bool exact, long double v, float alpha, long double d) {
  if (!f32_path<T>(exact)) return load(round_into<T>(v + (long double)alpha * d));
  const float ad = alpha * f32(d);
  const float sum = f32(v) + ad;
  return load(round_f32<T>(sum));
}
template <class T> static long double want_direction(bool exact, float beta, long double p, bool pre,
                                                     long double m, long double r) {
  if (!f32_path<T>(exact)) return load(round_into<T>((long double)beta * p - (pre ? m : 1.0L) * r));
  const float z = pre ? f32(m) * f32(r) : f32(r);
  const float bp = beta * f32(p);
  const float diff = bp - z;
  return load(round_f32<T>(diff));
}

template <class T>
static void test_ops(const std::vector<int64_t>& numels, uint64_t seed, bool exact) {
  std::mt19937_64 rng(seed);
  const cpu::ListShape s{dtype_of<T>(), (int64_t)numels.size(), numels.data()};
  Lists<T> x(numels, rng), y(numels, rng), p(numels, rng), hp(numels, rng);
  std::vector<std::vector<T>> m_data;
  Lists<T> minv(numels, rng);
  for (auto& v : minv.data)
    for (auto& e : v) e = store<T>(0.5 + std::fabs(load(e)));  // positive diagonal

  // dot / norm
  long double dot = 0, dabs = 0, nsq = 0;
  for (size_t t = 0; t < numels.size(); ++t)
    for (int64_t i = 0; i < numels[t]; ++i) {
      dot += x.at(t, i) * y.at(t, i);
      dabs += std::fabs(x.at(t, i) * y.at(t, i));
      nsq += x.at(t, i) * x.at(t, i);
    }
  CHECK(close(cpu::mt_dot(s, x.c(), y.c()), dot, dabs), "mt_dot %s", dtype_name(s.dtype));
  CHECK(close(cpu::mt_norm_sq(s, x.c()), nsq, nsq), "mt_norm_sq %s", dtype_name(s.dtype));

#ifdef _OPENMP
  // Same bits with 1 and 2 threads (fixed chunking and summation order).
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const double d1 = cpu::mt_dot(s, x.c(), y.c());
  omp_set_num_threads(2);
  const double d2 = cpu::mt_dot(s, x.c(), y.c());
  omp_set_num_threads(saved);
  CHECK(d1 == d2, "mt_dot depends on the thread count: %.17g vs %.17g", d1, d2);
#endif

  // axpby: y = a x + b y, one rounding per element (exact), or the float32 formula
  {
    Lists<T> yy = y;
    yy.ptrs.clear();
    for (auto& v : yy.data) yy.ptrs.push_back(v.data());
    const float a = 0.37f, b = -1.25f;
    cpu::mt_axpby(s, yy.m(), x.c(), a, b, exact);
    for (size_t t = 0; t < numels.size(); ++t)
      for (int64_t i = 0; i < numels[t]; ++i) {
        const long double want = want_axpby<T>(exact, a, x.at(t, i), b, y.at(t, i));
        CHECK(yy.at(t, i) == want, "mt_axpby %s exact=%d [%zu][%lld]", dtype_name(s.dtype), exact, t,
              (long long)i);
      }
    // xs is ys (the aliasing the op allows): the same values as from a separate copy
    Lists<T> self = y, other = y;
    for (auto* L : {&self, &other}) {
      L->ptrs.clear();
      for (auto& v : L->data) L->ptrs.push_back(v.data());
    }
    cpu::mt_axpby(s, self.m(), self.c(), a, b, exact);
    cpu::mt_axpby(s, other.m(), y.c(), a, b, exact);
    bool same = true;
    for (size_t t = 0; t < numels.size(); ++t)
      same = same && std::memcmp(self.data[t].data(), other.data[t].data(), sizeof(T) * numels[t]) == 0;
    CHECK(same, "mt_axpby %s exact=%d with xs == ys", dtype_name(s.dtype), exact);
  }

  // cg_step and cg_direction, with and without the preconditioner
  for (int pre = 0; pre < 2; ++pre) {
    Lists<T> xx = x, rr = y, pp = p;
    for (auto* L : {&xx, &rr, &pp}) {
      L->ptrs.clear();
      for (auto& v : L->data) L->ptrs.push_back(v.data());
    }
    const float alpha = -0.8125f, beta = 0.4375f;
    const cpu::ConstList mc = pre ? minv.c() : cpu::ConstList{nullptr};
    const cpu::CgStepNorms n =
        cpu::mt_cg_step(s, xx.m(), rr.m(), pp.c(), hp.c(), mc, alpha, exact);
    long double xs = 0, rs = 0, rz = 0;
    for (size_t t = 0; t < numels.size(); ++t)
      for (int64_t i = 0; i < numels[t]; ++i) {
        const long double xn = want_update<T>(exact, x.at(t, i), alpha, p.at(t, i));
        const long double rn = want_update<T>(exact, y.at(t, i), alpha, hp.at(t, i));
        CHECK(xx.at(t, i) == xn && rr.at(t, i) == rn, "mt_cg_step values %s exact=%d",
              dtype_name(s.dtype), exact);
        xs += xn * xn;
        rs += rn * rn;
        rz += rn * (pre ? minv.at(t, i) : 1.0L) * rn;
      }
    CHECK(close(n.x_norm_sq, xs, xs) && close(n.r_norm_sq, rs, rs) && close(n.r_dot_z, rz, rz),
          "mt_cg_step norms %s pre=%d: %.17g %.17g %.17g vs %.17Lg %.17Lg %.17Lg", dtype_name(s.dtype),
          pre, n.x_norm_sq, n.r_norm_sq, n.r_dot_z, xs, rs, rz);

    cpu::mt_cg_direction(s, pp.m(), rr.c(), mc, beta, exact);
    for (size_t t = 0; t < numels.size(); ++t)
      for (int64_t i = 0; i < numels[t]; ++i) {
        const long double want =
            want_direction<T>(exact, beta, p.at(t, i), pre, pre ? minv.at(t, i) : 1.0L, rr.at(t, i));
        CHECK(pp.at(t, i) == want, "mt_cg_direction %s exact=%d pre=%d", dtype_name(s.dtype), exact,
              pre);
      }
  }
}

// The float32 path is not the float64 one (else the flag would be ignored): with
// x = y = 1, a = 1 and b = 2^-8 + 2^-30, 1 + b rounds up to 1 + 2^-7 from double, but
// float32 gives the tie 1 + 2^-8 first, which RNE sends to 1.
static void test_paths_differ() {
  std::mt19937_64 rng(11);
  const std::vector<int64_t> numels = {4099};
  const cpu::ListShape s{DType::BFloat16, 1, numels.data()};
  Lists<bf16> x(numels, rng), y(numels, rng);
  x.data[0][0] = store<bf16>(1.0);
  y.data[0][0] = store<bf16>(1.0);
  Lists<bf16> y1 = y, y2 = y;
  for (auto* L : {&y1, &y2}) {
    L->ptrs.clear();
    for (auto& v : L->data) L->ptrs.push_back(v.data());
  }
  const float a = 1.0f, b = 0x1p-8f + 0x1p-30f;
  cpu::mt_axpby(s, y1.m(), x.c(), a, b, false);
  cpu::mt_axpby(s, y2.m(), x.c(), a, b, true);
  CHECK(y1.data[0][0].bits == 0x3f80 && y2.data[0][0].bits == 0x3f81,
        "bf16 axpby 1 + (2^-8 + 2^-30): fast %04x (want 3f80), exact %04x (want 3f81)",
        y1.data[0][0].bits, y2.data[0][0].bits);
}

int main() {
  test_roundtrips();
  test_single_rounding();
  test_round_doubles();
  // odd sizes, an empty tensor, sizes straddling the chunk and lane widths
  const std::vector<int64_t> shapes = {1, 7, 0, 123, 4097, cpu::kChunkElems + 3, 16 * 4096, 9};
  for (const bool exact : {true, false}) {
    test_ops<float>(shapes, 1, exact);
    test_ops<bf16>(shapes, 2, exact);
    test_ops<fp16>(shapes, 3, exact);
  }
  std::vector<int64_t> many(300, 17);  // many tiny tensors
  test_ops<float>(many, 4, false);
  test_ops<bf16>(many, 5, false);
  test_ops<fp16>(many, 6, true);
  test_paths_differ();
  return llmopt_test::finish("test_multi_tensor_cpu");
}
