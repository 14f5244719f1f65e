// Unit tests of the CPU LoRA merge kernel (run by ctest): against an oracle
// written from the contract in csrc/cpu/lora.h (float32 accumulation in j
// order, one rounding of W + D from double), for every W dtype, strided
// factors (fan_in_fan_out), odd sizes and more than one column tile; and
// merge followed by unmerge stays within half an ulp of the merged value
// plus half an ulp of W.
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

int main() {
  const int64_t shapes[][3] = {{1, 1, 1}, {7, 5, 3}, {33, 4100, 16}, {300, 257, 64}};
  unsigned seed = 1;
  for (const auto& sh : shapes)
    for (int t = 0; t < 2; ++t) {
      run_case<float>(DType::Float32, sh[0], sh[1], sh[2], t, seed++);
      run_case<bf16>(DType::BFloat16, sh[0], sh[1], sh[2], t, seed++);
      run_case<fp16>(DType::Float16, sh[0], sh[1], sh[2], t, seed++);
    }
  return llmopt_test::finish("test_lora_cpu");
}
