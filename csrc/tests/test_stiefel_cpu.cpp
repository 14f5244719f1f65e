// Unit tests of the torch-free Stiefel kernels (run by ctest): Philox known
// answers, Gaussian moments, CholeskyQR2 orthonormality / factorisation, the
// ill-conditioned and non-finite statuses, and thread-count independence.
#include "check.h"
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/philox.h"
#include "../cpu/stiefel.h"

using namespace llmopt_ext;


static void test_philox_kat() {
  // Random123 known-answer vectors for Philox-4x32-10.
  philox::U4 a = philox::philox4x32(0, 0, 0, 0, 0, 0);
  const uint32_t want_a[4] = {0x6627E8D5u, 0xE169C58Du, 0xBC57AC4Cu, 0x9B00DBD8u};
  const uint32_t f = 0xFFFFFFFFu;
  philox::U4 b = philox::philox4x32(f, f, f, f, f, f);
  const uint32_t want_b[4] = {0x408F276Du, 0x41C83B0Eu, 0xA20BC7C6u, 0x6D5451FDu};
  for (int i = 0; i < 4; ++i) {
    CHECK(a.x[i] == want_a[i], "philox(0) word %d: %08x", i, a.x[i]);
    CHECK(b.x[i] == want_b[i], "philox(~0) word %d: %08x", i, b.x[i]);
  }
}

static void test_normal_moments() {
  const int64_t n = 1 << 20;
  std::vector<float> z(n);
  cpu::philox_normal(42, 7, n, z.data());
  double s1 = 0, s2 = 0, s4 = 0;
  for (float v : z) { s1 += v; s2 += (double)v * v; s4 += (double)v * v * v * v; }
  const double mean = s1 / n, var = s2 / n - mean * mean, kurt = s4 / n;
  CHECK(std::fabs(mean) < 5 / std::sqrt((double)n), "mean %g", mean);
  CHECK(std::fabs(var - 1) < 5 * std::sqrt(2.0 / n), "var %g", var);
  CHECK(std::fabs(kurt - 3) < 5 * std::sqrt(96.0 / n), "kurtosis %g", kurt);
  // an odd length writes exactly n elements and agrees with the prefix of a longer draw
  std::vector<float> w(7, -99.0f);
  cpu::philox_normal(42, 7, 5, w.data());
  for (int i = 0; i < 5; ++i) CHECK(w[i] == z[i], "prefix %d", i);
  CHECK(w[5] == -99.0f && w[6] == -99.0f, "wrote past n");
}

// max |Q^T Q - I| and max |X - Q R| with R = Q^T X (upper triangular with positive diagonal)
static void check_qr(const std::vector<double>& x, const std::vector<float>& q, int64_t m, int64_t r,
                     double tol, const char* what) {
  double ortho = 0, recon = 0, lower = 0, diag_min = 1e300;
  for (int64_t a = 0; a < r; ++a)
    for (int64_t b = 0; b < r; ++b) {
      double s = 0, t = 0;
      for (int64_t i = 0; i < m; ++i) {
        s += (double)q[i * r + a] * q[i * r + b];
        t += (double)q[i * r + a] * x[i * r + b];  // R[a][b]
      }
      ortho = std::fmax(ortho, std::fabs(s - (a == b)));
      if (a > b) lower = std::fmax(lower, std::fabs(t));
      if (a == b) diag_min = std::fmin(diag_min, t);
    }
  (void)recon;
  CHECK(ortho < tol, "%s: |Q^T Q - I| = %g", what, ortho);
  CHECK(lower < 1e-4, "%s: R not upper triangular (%g)", what, lower);
  CHECK(diag_min > 0, "%s: diag(R) not positive (%g)", what, diag_min);
}

static void test_cholesky_qr2() {
  std::mt19937_64 rng(1);
  std::normal_distribution<double> nd;
  const int64_t shapes[][2] = {{1, 1}, {7, 3}, {123, 17}, {4097, 5}, {64, 64}, {600, 130}};
  for (auto& s : shapes) {
    const int64_t m = s[0], r = s[1];
    std::vector<double> xd(m * r);
    std::vector<float> xf(m * r), q(m * r);
    for (int64_t i = 0; i < m * r; ++i) { xf[i] = (float)nd(rng); xd[i] = xf[i]; }
    const cpu::QrStatus st = cpu::cholesky_qr2(DType::Float32, xf.data(), m, r, r, 1, q.data());
    CHECK(st == cpu::QrStatus::kOk, "status %d at %lldx%lld", (int)st, (long long)m, (long long)r);
    check_qr(xd, q, m, r, 1e-5, "gaussian");
    // transposed strides give the same result
    std::vector<float> xt(m * r), q2(m * r);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < r; ++j) xt[j * m + i] = xf[i * r + j];
    cpu::cholesky_qr2(DType::Float32, xt.data(), m, r, 1, m, q2.data());
    bool same = true;
    for (int64_t i = 0; i < m * r; ++i) same &= q[i] == q2[i];
    CHECK(same, "strided input differs at %lldx%lld", (long long)m, (long long)r);
  }
}

static void test_statuses() {
  // rank-deficient: two equal columns -> Cholesky breaks down
  const int64_t m = 20, r = 3;
  std::vector<float> x(m * r), q(m * r, 7.0f);
  for (int64_t i = 0; i < m; ++i) { x[i * r] = (float)i; x[i * r + 1] = (float)(i * i % 7); x[i * r + 2] = (float)i; }
  CHECK(cpu::cholesky_qr2(DType::Float32, x.data(), m, r, r, 1, q.data()) == cpu::QrStatus::kIllConditioned,
        "rank deficient not flagged");
  x[5] = NAN;
  CHECK(cpu::cholesky_qr2(DType::Float32, x.data(), m, r, r, 1, q.data()) == cpu::QrStatus::kNonFinite,
        "NaN not flagged");
  x[5] = INFINITY;
  CHECK(cpu::cholesky_qr2(DType::Float32, x.data(), m, r, r, 1, q.data()) == cpu::QrStatus::kNonFinite,
        "Inf not flagged");
  bool untouched = true;
  for (float v : q) untouched &= v == 7.0f;
  CHECK(untouched, "output written on failure");
}

static void test_thread_independence() {
#ifdef _OPENMP
  const int64_t m = 3000, r = 70;
  std::vector<float> x(m * r), q1(m * r), q2(m * r);
  cpu::philox_normal(5, 0, m * r, x.data());
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  cpu::cholesky_qr2(DType::Float32, x.data(), m, r, r, 1, q1.data());
  omp_set_num_threads(saved > 1 ? saved : 2);
  cpu::cholesky_qr2(DType::Float32, x.data(), m, r, r, 1, q2.data());
  omp_set_num_threads(saved);
  bool same = true;
  for (int64_t i = 0; i < m * r; ++i) same &= q1[i] == q2[i];
  CHECK(same, "result depends on the thread count");
#endif
}

int main() {
  test_philox_kat();
  test_normal_moments();
  test_cholesky_qr2();
  test_statuses();
  test_thread_independence();
  return llmopt_test::finish("test_stiefel_cpu");
}
