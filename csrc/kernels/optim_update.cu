// Fused optimizer updates (SophiaG/H, AdaHessian), CUDA: one launch per 512
// tensors over the shared chunked launcher (multi_tensor_apply.cuh), each
// element read and written once, float32 math from optim_update_math.h
// (the same expressions as the CPU kernels, no FMA contraction), params
// rounded once on store. Torch-free.

#include "multi_tensor_apply.cuh"
#include "optim_update_cuda.h"
#include "storage_types.cuh"

namespace llmopt_ext {
namespace cuda {
namespace {

// 512 tensors: AdaHessian's depth-5 table is 52 B per tensor = 26.6 KiB of
// kernel parameters (< 32 KiB), so a 512-tensor LoRA list is one launch.
constexpr int kMaxTensors = 512;
// 8192 elements per block = 256 threads x 4 loads in flight x 8 iterations
// (the shape of multi_tensor.cu).
constexpr int64_t kChunk = 8192;
constexpr int kThreads = 256;
constexpr int kIlp = 4;

// Returns false (skip) when found_inf is set; sets the gradient divisor.
__device__ __forceinline__ bool amp_init(const AmpScalars& amp, float& scale) {
  if (amp.found_inf != nullptr && __ldg(amp.found_inf) != 0.0f) return false;
  scale = amp.grad_scale != nullptr ? __ldg(amp.grad_scale) : 1.0f;
  return true;
}

template <class T>
struct SophiaOp {  // p = {params (w), grads, exp_avgs (w), hessians}
  static constexpr int kDepth = 4;
  optim::SophiaCoefs c;
  AmpScalars amp;
  float scale;
  __device__ bool init() { return amp_init(amp, scale); }
  __device__ void chunk(void* const* p, int64_t begin, int len, int64_t) const {
    T* prm = static_cast<T*>(p[0]) + begin;
    const T* grd = static_cast<const T*>(p[1]) + begin;
    float* m = static_cast<float*>(p[2]) + begin;
    const float* h = static_cast<const float*>(p[3]) + begin;
    for (int base = threadIdx.x; base < len; base += kIlp * kThreads) {
      float pv[kIlp], gv[kIlp], mv[kIlp], hv[kIlp];
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const int i = base + j * kThreads;
        if (i < len) {
          pv[j] = to_f32(prm[i]);
          gv[j] = to_f32(grd[i]);
          mv[j] = m[i];
          hv[j] = h[i];
        }
      }
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const int i = base + j * kThreads;
        if (i < len) {
          optim::sophia_elem(c, pv[j], mv[j], gv[j] / scale, hv[j]);
          m[i] = mv[j];
          prm[i] = from_f32<T>(pv[j]);
        }
      }
    }
  }
};

template <class T>
struct AdaHessianOp {  // p = {params (w), grads, exp_avgs (w), exp_hessian_diag_sqs (w), hessians}
  static constexpr int kDepth = 5;
  AdaHessianHyper hyper;
  AmpScalars amp;
  optim::AdaHessianCoefs c;
  float scale;
  __device__ bool init() {
    if (!amp_init(amp, scale)) return false;
    const double step = hyper.step_ptr != nullptr ? __ldg(hyper.step_ptr) : hyper.step_value;
    c = optim::adahessian_coefs(hyper.lr, hyper.beta1, hyper.beta2, hyper.weight_decay, hyper.eps,
                                hyper.hessian_power, step);
    return true;
  }
  template <bool kSqrt>
  __device__ void run(void* const* p, int64_t begin, int len) const {
    T* prm = static_cast<T*>(p[0]) + begin;
    const T* grd = static_cast<const T*>(p[1]) + begin;
    float* m = static_cast<float*>(p[2]) + begin;
    float* v = static_cast<float*>(p[3]) + begin;
    const float* d = static_cast<const float*>(p[4]) + begin;
    for (int base = threadIdx.x; base < len; base += kIlp * kThreads) {
      float pv[kIlp], gv[kIlp], mv[kIlp], vv[kIlp], dv[kIlp];
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const int i = base + j * kThreads;
        if (i < len) {
          pv[j] = to_f32(prm[i]);
          gv[j] = to_f32(grd[i]);
          mv[j] = m[i];
          vv[j] = v[i];
          dv[j] = d[i];
        }
      }
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const int i = base + j * kThreads;
        if (i < len) {
          optim::adahessian_elem<kSqrt>(c, pv[j], mv[j], vv[j], gv[j] / scale, dv[j] / scale);
          m[i] = mv[j];
          v[i] = vv[j];
          prm[i] = from_f32<T>(pv[j]);
        }
      }
    }
  }
  __device__ void chunk(void* const* p, int64_t begin, int len, int64_t) const {
    if (c.sqrt_power) run<true>(p, begin, len);
    else run<false>(p, begin, len);
  }
};

// The launcher's table holds void* for every list; read-only lists are only read.
template <class P>
void* const* mut(P p) {
  return reinterpret_cast<void* const*>(const_cast<void*>(static_cast<const void*>(p)));
}

}  // namespace

cudaError_t sophia_update(const OptimLists& s, void* const* params, const void* const* grads,
                          float* const* exp_avgs, const float* const* hessians,
                          const optim::SophiaCoefs& c, AmpScalars amp, cudaStream_t stream) {
  return dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    void* const* lists[] = {params, mut(grads), mut(exp_avgs), mut(hessians)};
    SophiaOp<T> op{};
    op.c = c;
    op.amp = amp;
    return mta::multi_tensor_apply<kMaxTensors, kChunk, kThreads>(s.count, s.numels, lists, op,
                                                                  stream);
  });
}

cudaError_t adahessian_update(const OptimLists& s, void* const* params, const void* const* grads,
                              float* const* exp_avgs, float* const* exp_hessian_diag_sqs,
                              const float* const* hessians, const AdaHessianHyper& h,
                              AmpScalars amp, cudaStream_t stream) {
  return dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    void* const* lists[] = {params, mut(grads), mut(exp_avgs), mut(exp_hessian_diag_sqs),
                            mut(hessians)};
    AdaHessianOp<T> op{};
    op.hyper = h;
    op.amp = amp;
    return mta::multi_tensor_apply<kMaxTensors, kChunk, kThreads>(s.count, s.numels, lists, op,
                                                                  stream);
  });
}

}  // namespace cuda
}  // namespace llmopt_ext
