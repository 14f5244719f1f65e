// Random Stiefel matrices and tall-matrix orthonormalisation, CPU (OpenMP). Torch-free.
//
// philox_normal: standard normals from the counter-based generator in
//   philox.h, element i a pure function of (seed, offset, i).
// cholesky_qr2: the thin QR factor Q (R upper triangular with a POSITIVE
//   diagonal, which makes Q unique, and Haar-distributed when X is Gaussian) of
//   a tall m x r matrix by CholeskyQR2 (Fukaya et al. 2014): twice
//   { G = W^T W; G = L L^T; W = W L^-T }. All arithmetic is in double (the Gram
//   matrix squares the condition number: in float32 CholeskyQR breaks down at
//   cond(X) ~ 3e3, in double at ~1e7), with a fixed summation order, so the
//   result does not depend on the number of threads.
#pragma once

#include <cstdint>

#include "../common/float_types.h"

namespace llmopt_ext {
namespace cpu {

// out[i] = N(0, 1) variate i of stream (seed, offset), i in [0, n).
void philox_normal(uint64_t seed, uint64_t offset, int64_t n, float* out);

enum class QrStatus : int {
  kOk = 0,
  kIllConditioned = 1,  // Cholesky broke down or diag(R) spans > kMaxDiagRatio: use Householder
  kNonFinite = 2,       // X holds NaN or Inf (a column norm is not finite); out untouched
};

// A diag(R) ratio above this (an underestimate of cond(X)) sends the matrix to
// Householder QR: at cond 1e6 the first double pass leaves ||Q^T Q - I|| ~
// cond^2 * 2^-53 ~ 1e-4, which the second pass removes; much beyond, the
// Cholesky of the Gram matrix is not reliable.
constexpr double kMaxDiagRatio = 1e6;

// x: m x r with element strides (row_stride, col_stride) of type dtype;
// out: m x r row-major contiguous of type dtype (written only on kOk).
// Requires m >= r >= 1.
QrStatus cholesky_qr2(DType dtype, const void* x, int64_t m, int64_t r, int64_t row_stride,
                      int64_t col_stride, void* out);

// Building blocks, exposed for the unit tests.
// g (r x r, row-major, full symmetric) = w^T w for row-major double w (m x r).
void gram(const double* w, int64_t m, int64_t r, double* g);
// In place lower Cholesky factor of g (upper triangle zeroed). Returns false on
// a non-positive or non-finite pivot.
bool cholesky_lower(double* g, int64_t r);
// w = w L^-T in place (each row solves q L^T = w_row by forward substitution).
void solve_lower_t(double* w, int64_t m, int64_t r, const double* l);

// Rows per Gram partial sum. The partial sums are added in chunk order, so
// the result is independent of the thread count; 256 rows x r <= 1024 columns of
// double panel stay in L2 while each partial's r x r block is updated.
constexpr int64_t kGramRows = 256;
// At most this many partial Gram matrices (memory: kMaxPartials * r^2 doubles).
constexpr int64_t kMaxPartials = 16;

}  // namespace cpu
}  // namespace llmopt_ext
