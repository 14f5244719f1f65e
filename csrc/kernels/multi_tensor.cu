// Multi-tensor vector ops for Steihaug-CG over the chunked launcher of
// multi_tensor_apply.cuh (pointer tables in the kernel parameters, one block
// per chunk of kChunkElems elements), with a deterministic two-stage
// reduction. Torch-free.
//
// Numerics match the CPU kernels bit for bit on element-wise results: loads
// are exact in double, products of two 16/32-bit floats are exact in double
// (so FMA contraction cannot change a result), and each output is rounded
// once with __double2float_rn / __double2bfloat16 / __double2half (RNE).
// bfloat16/float16 with exact == false (the ops' default) instead take the
// float32 math of csrc/common/multi_tensor_math.h, shared with the CPU kernels:
// loads exact in float, float32 scalars, every product and sum rounded to float
// separately through __fmul_rn/__fadd_rn/__fsub_rn (never contracted into an
// FMA), then one __float2bfloat16_rn / __float2half_rn: axpby
// y = R16(fl(fl(a*x) + fl(b*y))); cg_step x = R16(fl(x + fl(alpha*p))),
// r = R16(fl(r + fl(alpha*hp))); cg_direction z = minv ? fl(minv*r) : r,
// p = R16(fl(fl(beta*p) - z)). cg_step's norms are float64 sums of the stored
// values either way.
// Reductions accumulate in double: per thread, then warp shuffles, then one
// partial per block in a workspace, summed in a fixed order by a finalize
// kernel, so the result does not depend on scheduling.

#include <type_traits>

#include "../common/multi_tensor_math.h"
#include "multi_tensor_apply.cuh"
#include "multi_tensor_cuda.h"
#include "storage_types.cuh"

namespace llmopt_ext {
namespace cuda {
namespace {

// 256 tensors keep the depth-5 table (cg_step with a preconditioner) at
// 13.3 KiB of kernel parameters; 512 LoRA tensors take two launches.
constexpr int kMaxTensors = 256;
constexpr int kIlp = 4;  // loads in flight per thread before any store
constexpr int kWarps = kBlockThreads / 32;

// ---- storage <-> double: storage_types.cuh ---------------------------------

template <class T>
__device__ __forceinline__ double ld(void* const* p, int d, int64_t i) {
  return to_f64(static_cast<const T*>(p[d])[i]);
}

__device__ __forceinline__ double resolve(Scalar s) {
  return s.ptr != nullptr ? static_cast<double>(__ldg(s.ptr)) : static_cast<double>(s.value);
}

template <class T>
__device__ __forceinline__ float ld32(void* const* p, int d, int64_t i) {
  return to_f32(static_cast<const T*>(p[d])[i]);
}

__device__ __forceinline__ float resolve_f32(Scalar s) {
  return s.ptr != nullptr ? __ldg(s.ptr) : s.value;
}

// ---- element-wise bodies --------------------------------------------------
// Each op loads its inputs for kIlp elements first (`load`), then computes and
// stores (`apply`): stores could alias later loads, so the compiler cannot
// batch the loads itself.

template <class T>
struct DotOp {
  static constexpr int kDepth = 2, kOut = 1;
  struct In { double x, y; };
  __device__ void init() {}
  __device__ In load(void* const* p, int64_t i) const { return {ld<T>(p, 0, i), ld<T>(p, 1, i)}; }
  __device__ void apply(void* const*, int64_t, const In& v, double* acc) const { acc[0] += v.x * v.y; }
};

template <class T>
struct NormSqOp {
  static constexpr int kDepth = 1, kOut = 1;
  struct In { double x; };
  __device__ void init() {}
  __device__ In load(void* const* p, int64_t i) const { return {ld<T>(p, 0, i)}; }
  __device__ void apply(void* const*, int64_t, const In& v, double* acc) const { acc[0] += v.x * v.x; }
};

template <class T>
struct AxpbyOp {  // p[0] = y (written), p[1] = x
  static constexpr int kDepth = 2, kOut = 0;
  Scalar sa, sb;
  double a, b;
  struct In { double y, x; };
  __device__ void init() { a = resolve(sa); b = resolve(sb); }
  __device__ In load(void* const* p, int64_t i) const { return {ld<T>(p, 0, i), ld<T>(p, 1, i)}; }
  __device__ void apply(void* const* p, int64_t i, const In& v, double*) const {
    static_cast<T*>(p[0])[i] = from_f64<T>(a * v.x + b * v.y);
  }
};

template <class T, bool kPre>
struct CgStepOp {  // p = {x (written), r (written), p, hp, minv}
  static constexpr int kDepth = kPre ? 5 : 4, kOut = 3;
  Scalar salpha;
  double alpha;
  struct In { double x, r, p, hp, m; };
  __device__ void init() { alpha = resolve(salpha); }
  __device__ In load(void* const* p, int64_t i) const {
    return {ld<T>(p, 0, i), ld<T>(p, 1, i), ld<T>(p, 2, i), ld<T>(p, 3, i),
            kPre ? ld<T>(p, kDepth - 1, i) : 1.0};
  }
  __device__ void apply(void* const* p, int64_t i, const In& v, double* acc) const {
    const T xn = from_f64<T>(v.x + alpha * v.p);
    const T rn = from_f64<T>(v.r + alpha * v.hp);
    static_cast<T*>(p[0])[i] = xn;
    static_cast<T*>(p[1])[i] = rn;
    const double xv = to_f64(xn), rv = to_f64(rn);
    acc[0] += xv * xv;
    acc[1] += rv * rv;
    acc[2] += kPre ? rv * (v.m * rv) : rv * rv;
  }
};

template <class T, bool kPre>
struct CgDirectionOp {  // p = {p (written), r, minv}
  static constexpr int kDepth = kPre ? 3 : 2, kOut = 0;
  Scalar sbeta;
  double beta;
  struct In { double p, r, m; };
  __device__ void init() { beta = resolve(sbeta); }
  __device__ In load(void* const* p, int64_t i) const {
    return {ld<T>(p, 0, i), ld<T>(p, 1, i), kPre ? ld<T>(p, kDepth - 1, i) : 1.0};
  }
  __device__ void apply(void* const* p, int64_t i, const In& v, double*) const {
    const double z = kPre ? v.m * v.r : v.r;
    static_cast<T*>(p[0])[i] = from_f64<T>(beta * v.p - z);
  }
};

// ---- bfloat16/float16, exact == false: float32 math (multi_tensor_math.h) ----

template <class T>
struct AxpbyF32Op {  // p[0] = y (written), p[1] = x
  static constexpr int kDepth = 2, kOut = 0;
  Scalar sa, sb;
  float a, b;
  struct In { float y, x; };
  __device__ void init() { a = resolve_f32(sa); b = resolve_f32(sb); }
  __device__ In load(void* const* p, int64_t i) const { return {ld32<T>(p, 0, i), ld32<T>(p, 1, i)}; }
  __device__ void apply(void* const* p, int64_t i, const In& v, double*) const {
    static_cast<T*>(p[0])[i] = from_f32<T>(mt::axpby_f32(a, v.x, b, v.y));
  }
};

template <class T, bool kPre>
struct CgStepF32Op {  // p = {x (written), r (written), p, hp, minv}
  static constexpr int kDepth = kPre ? 5 : 4, kOut = 3;
  Scalar salpha;
  float alpha;
  struct In { float x, r, p, hp; double m; };
  __device__ void init() { alpha = resolve_f32(salpha); }
  __device__ In load(void* const* p, int64_t i) const {
    return {ld32<T>(p, 0, i), ld32<T>(p, 1, i), ld32<T>(p, 2, i), ld32<T>(p, 3, i),
            kPre ? ld<T>(p, kDepth - 1, i) : 1.0};
  }
  __device__ void apply(void* const* p, int64_t i, const In& v, double* acc) const {
    const T xn = from_f32<T>(mt::cg_update_f32(v.x, alpha, v.p));
    const T rn = from_f32<T>(mt::cg_update_f32(v.r, alpha, v.hp));
    static_cast<T*>(p[0])[i] = xn;
    static_cast<T*>(p[1])[i] = rn;
    const double xv = to_f64(xn), rv = to_f64(rn);  // the norms as on the exact path
    acc[0] += xv * xv;
    acc[1] += rv * rv;
    acc[2] += kPre ? rv * (v.m * rv) : rv * rv;
  }
};

template <class T, bool kPre>
struct CgDirectionF32Op {  // p = {p (written), r, minv}
  static constexpr int kDepth = kPre ? 3 : 2, kOut = 0;
  Scalar sbeta;
  float beta;
  struct In { float p, r, m; };
  __device__ void init() { beta = resolve_f32(sbeta); }
  __device__ In load(void* const* p, int64_t i) const {
    return {ld32<T>(p, 0, i), ld32<T>(p, 1, i), kPre ? ld32<T>(p, kDepth - 1, i) : 1.0f};
  }
  __device__ void apply(void* const* p, int64_t i, const In& v, double*) const {
    const float z = kPre ? mt::precond_f32(v.m, v.r) : v.r;
    static_cast<T*>(p[0])[i] = from_f32<T>(mt::cg_direction_f32(beta, v.p, z));
  }
};

// The float32 path applies to 16-bit storage with exact == false only.
template <class T>
constexpr bool use_f32(bool exact) {
  return !exact && !std::is_same<T, float>::value;
}

// ---- reductions -----------------------------------------------------------

// Sums acc[k] over the block; thread k < K gets the total of output k.
template <int K>
__device__ __forceinline__ void block_sum(double (&acc)[K], double (&total)[K]) {
  __shared__ double smem[K][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    double v = acc[k];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) smem[k][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < K) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += smem[threadIdx.x][w];
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k == static_cast<int>(threadIdx.x)) total[k] = s;
  }
}

// Adapts an element-wise Op to multi_tensor_apply's chunk interface: kIlp
// loads in flight per thread, then the stores, then (for reductions) one
// partial per block into the workspace.
template <class Op>
struct ChunkOp {
  static constexpr int kDepth = Op::kDepth;
  Op op;
  double* partials;

  __device__ bool init() {
    op.init();
    return true;  // every block must write its partial
  }
  __device__ void chunk(void* const* p, int64_t begin, int len, int64_t block) {
    constexpr int kAcc = Op::kOut > 0 ? Op::kOut : 1;
    double acc[kAcc];
#pragma unroll
    for (int k = 0; k < kAcc; ++k) acc[k] = 0.0;
    for (int base = threadIdx.x; base < len; base += kIlp * kBlockThreads) {
      typename Op::In in[kIlp];
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const int i = base + j * kBlockThreads;
        if (i < len) in[j] = op.load(p, begin + i);
      }
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const int i = base + j * kBlockThreads;
        if (i < len) op.apply(p, begin + i, in[j], acc);
      }
    }
    if constexpr (Op::kOut > 0) {
      double total[Op::kOut];
      block_sum<Op::kOut>(acc, total);
      if (threadIdx.x < Op::kOut) {
#pragma unroll
        for (int k = 0; k < Op::kOut; ++k)
          if (k == static_cast<int>(threadIdx.x)) partials[block * Op::kOut + k] = total[k];
      }
    }
  }
};

// One block: sums the per-block partials in a fixed order, writes float outputs.
template <int K>
__global__ void __launch_bounds__(kBlockThreads)
finalize_kernel(const double* partials, int64_t nblocks, float* out) {
  double acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0.0;
  for (int64_t b = threadIdx.x; b < nblocks; b += kBlockThreads)
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] += partials[b * K + k];
  double total[K];
  block_sum<K>(acc, total);
  if (threadIdx.x < K) {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k == static_cast<int>(threadIdx.x)) out[k] = __double2float_rn(total[k]);
  }
}

// Launches Op over the lists; returns the number of blocks (= workspace
// partials written) in *blocks.
template <class Op>
cudaError_t launch(const ListShape& s, void* const* const* lists, const Op& op, double* partials,
                   cudaStream_t stream, int64_t* blocks = nullptr) {
  if (blocks != nullptr) *blocks = mta::num_blocks<kChunkElems>(s.count, s.numels);
  return mta::multi_tensor_apply<kMaxTensors, kChunkElems, kBlockThreads>(
      s.count, s.numels, lists, ChunkOp<Op>{op, partials}, stream);
}

template <int K>
cudaError_t finalize(int64_t nblocks, const double* partials, float* out, cudaStream_t stream) {
  finalize_kernel<K><<<1, kBlockThreads, 0, stream>>>(partials, nblocks, out);
  return cudaGetLastError();
}

void* const* mut(const void* const* p) { return const_cast<void* const*>(p); }

}  // namespace

int64_t reduction_workspace(const ListShape& s, int outputs) {
  const int64_t blocks = mta::num_blocks<kChunkElems>(s.count, s.numels);
  return (blocks > 0 ? blocks : 1) * outputs;
}

cudaError_t mt_dot(const ListShape& s, const void* const* xs, const void* const* ys, float* out,
                   double* workspace, cudaStream_t stream) {
  return dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    void* const* lists[] = {mut(xs), mut(ys)};
    int64_t nb;
    const cudaError_t err = launch(s, lists, DotOp<T>{}, workspace, stream, &nb);
    return err != cudaSuccess ? err : finalize<1>(nb, workspace, out, stream);
  });
}

cudaError_t mt_norm_sq(const ListShape& s, const void* const* xs, float* out, double* workspace,
                       cudaStream_t stream) {
  return dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    void* const* lists[] = {mut(xs)};
    int64_t nb;
    const cudaError_t err = launch(s, lists, NormSqOp<T>{}, workspace, stream, &nb);
    return err != cudaSuccess ? err : finalize<1>(nb, workspace, out, stream);
  });
}

cudaError_t mt_axpby(const ListShape& s, void* const* ys, const void* const* xs, Scalar a,
                     Scalar b, bool exact, cudaStream_t stream) {
  return dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    void* const* lists[] = {ys, mut(xs)};
    if (use_f32<T>(exact)) {
      AxpbyF32Op<T> op{};
      op.sa = a;
      op.sb = b;
      return launch(s, lists, op, nullptr, stream);
    }
    AxpbyOp<T> op{};
    op.sa = a;
    op.sb = b;
    return launch(s, lists, op, nullptr, stream);
  });
}

cudaError_t mt_cg_step(const ListShape& s, void* const* xs, void* const* rs,
                       const void* const* ps, const void* const* hps, const void* const* minv,
                       Scalar alpha, bool exact, float* out, double* workspace,
                       cudaStream_t stream) {
  return dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    int64_t nb;
    cudaError_t err;
    if (use_f32<T>(exact) && minv != nullptr) {
      void* const* lists[] = {xs, rs, mut(ps), mut(hps), mut(minv)};
      CgStepF32Op<T, true> op{};
      op.salpha = alpha;
      err = launch(s, lists, op, workspace, stream, &nb);
    } else if (use_f32<T>(exact)) {
      void* const* lists[] = {xs, rs, mut(ps), mut(hps)};
      CgStepF32Op<T, false> op{};
      op.salpha = alpha;
      err = launch(s, lists, op, workspace, stream, &nb);
    } else if (minv != nullptr) {
      void* const* lists[] = {xs, rs, mut(ps), mut(hps), mut(minv)};
      CgStepOp<T, true> op{};
      op.salpha = alpha;
      err = launch(s, lists, op, workspace, stream, &nb);
    } else {
      void* const* lists[] = {xs, rs, mut(ps), mut(hps)};
      CgStepOp<T, false> op{};
      op.salpha = alpha;
      err = launch(s, lists, op, workspace, stream, &nb);
    }
    return err != cudaSuccess ? err : finalize<3>(nb, workspace, out, stream);
  });
}

cudaError_t mt_cg_direction(const ListShape& s, void* const* ps, const void* const* rs,
                            const void* const* minv, Scalar beta, bool exact,
                            cudaStream_t stream) {
  return dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (use_f32<T>(exact)) {
      if (minv != nullptr) {
        void* const* lists[] = {ps, mut(rs), mut(minv)};
        CgDirectionF32Op<T, true> op{};
        op.sbeta = beta;
        return launch(s, lists, op, nullptr, stream);
      }
      void* const* lists[] = {ps, mut(rs)};
      CgDirectionF32Op<T, false> op{};
      op.sbeta = beta;
      return launch(s, lists, op, nullptr, stream);
    }
    if (minv != nullptr) {
      void* const* lists[] = {ps, mut(rs), mut(minv)};
      CgDirectionOp<T, true> op{};
      op.sbeta = beta;
      return launch(s, lists, op, nullptr, stream);
    }
    void* const* lists[] = {ps, mut(rs)};
    CgDirectionOp<T, false> op{};
    op.sbeta = beta;
    return launch(s, lists, op, nullptr, stream);
  });
}

}  // namespace cuda
}  // namespace llmopt_ext
