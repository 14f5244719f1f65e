// Random Stiefel matrices and CholeskyQR2, CPU implementation (OpenMP).
#include "stiefel.h"

#include <algorithm>
#include <vector>

#include "../common/philox.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include "target_clones.h"

namespace llmopt_ext {
namespace cpu {

// ---------------------------------------------------------------------------
// Gaussian generator

namespace {

// Counter blocks per chunk: the Philox words and the normals of a chunk stay
// in L1 (4 x 4 KiB each way), and each loop below is one flat, vectorisable
// pass over it.
constexpr int64_t kNormalChunk = 256;

// Structure-of-arrays passes, so the compiler vectorises across counter
// blocks: Philox words, then Box-Muller on each lane pair, then interleave.
LLMOPT_CLONES
void normal_chunk(uint64_t seed, uint64_t offset, uint64_t first, int64_t count, float* out) {
  uint32_t w[4][kNormalChunk];
  float z[4][kNormalChunk];
  for (int64_t j = 0; j < count; ++j) {
    const philox::U4 u = philox::block_words(seed, offset, first + static_cast<uint64_t>(j));
    for (int l = 0; l < 4; ++l) w[l][j] = u.x[l];
  }
  for (int64_t j = 0; j < count; ++j) philox::box_muller(w[0][j], w[1][j], &z[0][j], &z[1][j]);
  for (int64_t j = 0; j < count; ++j) philox::box_muller(w[2][j], w[3][j], &z[2][j], &z[3][j]);
  for (int64_t j = 0; j < count; ++j)
    for (int l = 0; l < 4; ++l) out[4 * j + l] = z[l][j];
}

}  // namespace

void philox_normal(uint64_t seed, uint64_t offset, int64_t n, float* out) {
  const int64_t full = n / 4;  // counter blocks written whole
  const int64_t chunks = (full + kNormalChunk - 1) / kNormalChunk;
  // ~4 ns per normal: below 64 chunks (256K normals) a fork costs more than it saves.
#pragma omp parallel for schedule(static) if (chunks >= 64)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t first = c * kNormalChunk;
    normal_chunk(seed, offset, static_cast<uint64_t>(first), std::min(kNormalChunk, full - first),
                 out + 4 * first);
  }
  if (n > 4 * full) {  // the last, partial block
    float z[4];
    philox::normal4(seed, offset, static_cast<uint64_t>(full), z);
    for (int64_t j = 0; j < n - 4 * full; ++j) out[4 * full + j] = z[j];
  }
}

// ---------------------------------------------------------------------------
// Gram matrix, Cholesky, triangular solve (double)

namespace {

// Rows folded into one sweep over the r x r accumulator: 8 rows cut the
// accumulator's load/store traffic 8-fold relative to rank-1 updates.
constexpr int64_t kRowBlock = 8;

// g_upper[j][k] (k >= j) += sum over rows [i0, i1) of w[i][j] w[i][k]
LLMOPT_CLONES
void gram_rows(const double* __restrict w, int64_t i0, int64_t i1, int64_t r,
               double* __restrict g) {
  int64_t i = i0;
  for (; i + kRowBlock <= i1; i += kRowBlock) {
    const double* rows[kRowBlock];
    for (int64_t t = 0; t < kRowBlock; ++t) rows[t] = w + (i + t) * r;
    for (int64_t j = 0; j < r; ++j) {
      double a[kRowBlock];
      for (int64_t t = 0; t < kRowBlock; ++t) a[t] = rows[t][j];
      double* __restrict gj = g + j * r;
      for (int64_t k = j; k < r; ++k) {
        // fixed association: ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        const double s01 = a[0] * rows[0][k] + a[1] * rows[1][k];
        const double s23 = a[2] * rows[2][k] + a[3] * rows[3][k];
        const double s45 = a[4] * rows[4][k] + a[5] * rows[5][k];
        const double s67 = a[6] * rows[6][k] + a[7] * rows[7][k];
        gj[k] += (s01 + s23) + (s45 + s67);
      }
    }
  }
  for (; i < i1; ++i) {
    const double* row = w + i * r;
    for (int64_t j = 0; j < r; ++j) {
      const double a = row[j];
      double* __restrict gj = g + j * r;
      for (int64_t k = j; k < r; ++k) gj[k] += a * row[k];
    }
  }
}

constexpr int kLanes = 8;

// sum_k x[k] y[k], k < n, with kLanes fixed accumulators (vectorisable, same
// order in every clone).
inline __attribute__((always_inline)) double dot_lanes(const double* __restrict x,
                                                       const double* __restrict y, int64_t n) {
  double acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[k + j] * y[k + j];
  for (int j = 0; k < n; ++k, ++j) acc[j] += x[k] * y[k];
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

// Forward substitution q L^T = w for rows [i0, i1) of w, in place.
LLMOPT_CLONES
void solve_rows(double* __restrict w, int64_t i0, int64_t i1, int64_t r,
                const double* __restrict l, const double* __restrict inv_diag) {
  for (int64_t i = i0; i < i1; ++i) {
    double* q = w + i * r;
    for (int64_t j = 0; j < r; ++j) q[j] = (q[j] - dot_lanes(q, l + j * r, j)) * inv_diag[j];
  }
}

LLMOPT_CLONES
double row_dot(const double* __restrict x, const double* __restrict y, int64_t n) {
  return dot_lanes(x, y, n);
}

}  // namespace

void gram(const double* w, int64_t m, int64_t r, double* g) {
  const int64_t parts = std::max<int64_t>(1, std::min(kMaxPartials, (m + kGramRows - 1) / kGramRows));
  const int64_t rr = r * r;
  std::vector<double> partial(static_cast<size_t>(parts * rr), 0.0);
  // Work ~ m r^2 / 2: parallel once it exceeds ~1M multiply-adds.
#pragma omp parallel for schedule(static) if (parts > 1 && m * r * r >= (1 << 21))
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t i0 = m * p / parts, i1 = m * (p + 1) / parts;
    gram_rows(w, i0, i1, r, partial.data() + p * rr);
  }
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t k = j; k < r; ++k) {
      double s = 0.0;
      for (int64_t p = 0; p < parts; ++p) s += partial[p * rr + j * r + k];
      g[j * r + k] = s;
      g[k * r + j] = s;
    }
  }
}

bool cholesky_lower(double* g, int64_t r) {
  // Row-oriented (Cholesky-Crout): row i needs rows < i of L, so rows are
  // computed in order; the r^3/6 multiply-adds are negligible next to the
  // m r^2 of the Gram matrix and the solve for the tall shapes this serves.
  for (int64_t i = 0; i < r; ++i) {
    double* li = g + i * r;
    for (int64_t j = 0; j < i; ++j) {
      const double* lj = g + j * r;
      li[j] = (li[j] - row_dot(li, lj, j)) / lj[j];
    }
    const double d = li[i] - row_dot(li, li, i);
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    li[i] = std::sqrt(d);
    for (int64_t k = i + 1; k < r; ++k) li[k] = 0.0;
  }
  return true;
}

void solve_lower_t(double* w, int64_t m, int64_t r, const double* l) {
  std::vector<double> inv_diag(static_cast<size_t>(r));
  for (int64_t j = 0; j < r; ++j) inv_diag[j] = 1.0 / l[j * r + j];
  // Rows are independent; 64-row tasks keep the r x r factor hot in L2.
  const int64_t tasks = (m + 63) / 64;
#pragma omp parallel for schedule(static) if (tasks > 1 && m * r * r >= (1 << 21))
  for (int64_t t = 0; t < tasks; ++t)
    solve_rows(w, 64 * t, std::min(m, 64 * (t + 1)), r, l, inv_diag.data());
}

// ---------------------------------------------------------------------------
// CholeskyQR2

namespace {

template <class T>
void load_matrix(const T* x, int64_t m, int64_t r, int64_t rs, int64_t cs, double* w) {
#pragma omp parallel for schedule(static) if (m * r >= (1 << 18))
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < r; ++j) w[i * r + j] = load(x[i * rs + j * cs]);
}

template <class T>
void store_matrix(const double* w, int64_t n, T* out) {
#pragma omp parallel for schedule(static) if (n >= (1 << 18))
  for (int64_t i = 0; i < n; ++i) out[i] = store<T>(w[i]);
}

// One CholeskyQR pass on w (m x r, double, in place); g is r x r scratch.
QrStatus cholqr_pass(double* w, int64_t m, int64_t r, double* g, bool check_input) {
  gram(w, m, r, g);
  if (check_input) {
    // diag(G) are the squared column norms: not finite iff a column holds NaN/Inf
    // (float inputs cannot overflow a double sum of squares).
    for (int64_t j = 0; j < r; ++j)
      if (!std::isfinite(g[j * r + j])) return QrStatus::kNonFinite;
  }
  if (!cholesky_lower(g, r)) return QrStatus::kIllConditioned;
  double lo = g[0], hi = g[0];
  for (int64_t j = 1; j < r; ++j) {
    lo = std::min(lo, g[j * r + j]);
    hi = std::max(hi, g[j * r + j]);
  }
  if (hi > kMaxDiagRatio * lo) return QrStatus::kIllConditioned;
  solve_lower_t(w, m, r, g);
  return QrStatus::kOk;
}

template <class T>
QrStatus cholesky_qr2_t(const T* x, int64_t m, int64_t r, int64_t rs, int64_t cs, T* out) {
  std::vector<double> w(static_cast<size_t>(m * r)), g(static_cast<size_t>(r * r));
  load_matrix(x, m, r, rs, cs, w.data());
  QrStatus s = cholqr_pass(w.data(), m, r, g.data(), /*check_input=*/true);
  if (s != QrStatus::kOk) return s;
  s = cholqr_pass(w.data(), m, r, g.data(), /*check_input=*/false);
  if (s != QrStatus::kOk) return s;
  store_matrix(w.data(), m * r, out);
  return QrStatus::kOk;
}

}  // namespace

QrStatus cholesky_qr2(DType dtype, const void* x, int64_t m, int64_t r, int64_t rs, int64_t cs,
                      void* out) {
  switch (dtype) {
    case DType::Float32:
      return cholesky_qr2_t(static_cast<const float*>(x), m, r, rs, cs, static_cast<float*>(out));
    case DType::BFloat16:
      return cholesky_qr2_t(static_cast<const bf16*>(x), m, r, rs, cs, static_cast<bf16*>(out));
    case DType::Float16:
      return cholesky_qr2_t(static_cast<const fp16*>(x), m, r, rs, cs, static_cast<fp16*>(out));
  }
  return QrStatus::kIllConditioned;
}

}  // namespace cpu
}  // namespace llmopt_ext
