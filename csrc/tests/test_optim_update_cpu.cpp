// Unit tests of the CPU fused optimizer updates (run by ctest): against
// long-double loops written from the update rules, for every dtype, with
// lists crossing the chunk size, a grad scale, and thread-count independence.
#include "check.h"
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../cpu/optim_update.h"

using namespace llmopt_ext;


template <class T> T from_double(double d) { return store<T>(d); }
template <class T> double to_double(T v) { return load(v); }

// Relative tolerance of the float32 math vs long double: a few float32 ulps on
// the state, plus one storage ulp on params.
template <class T> double param_ulp();
template <> double param_ulp<float>() { return 0x1p-23; }
template <> double param_ulp<bf16>() { return 0x1p-8; }
template <> double param_ulp<fp16>() { return 0x1p-11; }

template <class T>
void test_dtype(DType dt, bool clip_mode, bool adahessian) {
  const std::vector<int64_t> numels = {1, 7, 123, 0, 16384 + 5, 40000};
  std::mt19937 rng(42);
  std::normal_distribution<double> nd(0.0, 1.0);
  const size_t n = numels.size();
  std::vector<std::vector<T>> p(n), g(n);
  std::vector<std::vector<float>> m(n), v(n), h(n);
  for (size_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < numels[t]; ++i) {
      p[t].push_back(from_double<T>(nd(rng)));
      g[t].push_back(from_double<T>(nd(rng) * 4.0));  // scaled by 4 (exact)
      m[t].push_back(static_cast<float>(nd(rng) * 0.5));
      v[t].push_back(static_cast<float>(std::fabs(nd(rng))));
      h[t].push_back(static_cast<float>(adahessian ? nd(rng) * 0.3 : std::fabs(nd(rng)) * 0.1));
    }
  auto p0 = p;
  auto m0 = m, v0 = v;
  std::vector<void*> pp(n);
  std::vector<const void*> gp(n);
  std::vector<float*> mp(n), vp(n);
  std::vector<const float*> hp(n);
  for (size_t t = 0; t < n; ++t) {
    pp[t] = p[t].data(); gp[t] = g[t].data(); mp[t] = m[t].data(); vp[t] = v[t].data(); hp[t] = h[t].data();
  }
  cpu::OptimLists s{dt, static_cast<int64_t>(n), numels.data()};
  const double lr = 0.05, b1 = 0.9, b2 = 0.999, rho = 0.5, wd = 0.1, eps = 1e-12, step = 3;
  if (adahessian) {
    const optim::AdaHessianCoefs c = optim::adahessian_coefs(lr, b1, b2, wd, 1e-4, 1.0, step);
    cpu::adahessian_update(s, pp.data(), gp.data(), mp.data(), vp.data(), hp.data(), c, 4.0f);
  } else {
    optim::SophiaCoefs c{static_cast<float>(lr), static_cast<float>(b1), static_cast<float>(1 - b1),
                         static_cast<float>(rho), static_cast<float>(eps),
                         static_cast<float>(1 - lr * wd), clip_mode};
    cpu::sophia_update(s, pp.data(), gp.data(), mp.data(), hp.data(), c, 4.0f);
  }
  for (size_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < numels[t]; ++i) {
      const long double gg = to_double(g[t][i]) / 4.0L, mm0 = m0[t][i], hh = h[t][i];
      const long double pv = to_double(p0[t][i]);
      const long double m1 = b1 * mm0 + (1 - b1) * gg;
      long double p1;
      if (adahessian) {
        const long double v1 = b2 * (long double)v0[t][i] + (1 - b2) * (hh / 4) * (hh / 4);
        const long double den = std::sqrt(v1 / (1 - std::pow(b2, step))) + 1e-4L;
        p1 = pv * (1 - lr * wd) - lr / (1 - std::pow(b1, step)) * m1 / den;
        CHECK(std::fabs(v[t][i] - v1) <= 4e-7L * std::fabs(v1) + 1e-30L, "v t=%zu i=%ld", t, (long)i);
      } else if (clip_mode) {
        long double u = m1 / std::max(hh, (long double)eps);
        u = std::min(std::max(u, -(long double)rho), (long double)rho);
        p1 = pv * (1 - lr * wd) - lr * u;
      } else {
        const long double r = std::min(std::fabs(m1) / (rho * hh + eps), 1.0L);
        p1 = pv * (1 - lr * wd) - lr * std::copysign(r, m1);
      }
      // float32 math: a few ulps of the terms (a sum may cancel), hyperparameters
      // rounded to float32 (2^-24 relative each).
      const long double m_terms = std::fabs(b1 * mm0) + std::fabs((1 - b1) * gg);
      CHECK(std::fabs(m[t][i] - m1) <= 4e-7L * m_terms + 1e-30L, "m t=%zu i=%ld", t, (long)i);
      const long double tol = param_ulp<T>() * std::fabs(p1) + 0x1p-22L * std::fabs(pv) + 1e-5L * lr;
      CHECK(std::fabs(to_double(p[t][i]) - p1) <= tol, "%s p t=%zu i=%ld got %g want %g",
            dtype_name(dt), t, (long)i, (double)to_double(p[t][i]), (double)p1);
    }
}

int main() {
  for (int threads : {1, 2}) {
#ifdef _OPENMP
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    for (bool ada : {false, true})
      for (bool clip : {false, true}) {
        if (ada && clip) continue;
        test_dtype<float>(DType::Float32, clip, ada);
        test_dtype<bf16>(DType::BFloat16, clip, ada);
        test_dtype<fp16>(DType::Float16, clip, ada);
      }
  }
  return llmopt_test::finish("test_optim_update_cpu");
}
