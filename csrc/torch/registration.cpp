// The one place where the schemas of all llmopt_ext ops are defined, plus the
// Python module stub `llmopt_ext._C`. Backend files (*_cpu.cpp, *_cuda.cpp)
// only register implementations; the fake (meta) implementation of each op,
// for torch.compile and FakeTensorMode, is registered in Python next to the
// op's wrapper (llmopt_ext/ops/multi_tensor.py, optim_update.py, stiefel.py;
// the LoRA merge fakes in llmopt_ext/ops/_fake.py).
//
// The module is a hand-written PyInit stub rather than pybind11: importing it
// runs the static registrations below, and skipping <torch/extension.h> (and
// the pybind11 headers it pulls in) cuts the compile of this file from ~55 s
// to ~12 s.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(llmopt_ext, m) {
  // ---- multi-tensor vector ops for Steihaug-CG (llmopt_ext/ops/multi_tensor.py)
  m.def("mt_dot(Tensor[] xs, Tensor[] ys) -> Tensor");
  m.def("mt_norm_sq(Tensor[] xs) -> Tensor");
  m.def("mt_axpby_(Tensor(a!)[] ys, Tensor[] xs, Tensor a, Tensor b, bool exact=False) -> ()");
  m.def(
      "mt_cg_step_(Tensor(a!)[] xs, Tensor(b!)[] rs, Tensor[] ps, Tensor[] hps, Tensor alpha, "
      "Tensor[]? minv=None, bool exact=False) -> Tensor");
  m.def(
      "mt_cg_direction_(Tensor(a!)[] ps, Tensor[] rs, Tensor beta, Tensor[]? minv=None, "
      "bool exact=False) -> ()");

  // ---- fused optimizer updates (llmopt_ext/ops/optim_update.py)
  m.def(
      "sophia_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor[] hessians, float lr, float beta1, float rho, float weight_decay, float eps, "
      "bool clip=False, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "adahessian_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_hessian_diag_sqs, Tensor[] hessians, Tensor step, float lr, float beta1, "
      "float beta2, float weight_decay, float eps, float hessian_power, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");

  // ---- LoRA merge / unmerge (llmopt_ext/ops/lora.py): W +/- s * B A in place,
  // accumulated in float32 and rounded once into W's dtype. lora_linear is not
  // an op of this library: it is a plain Python function (llmopt_ext.ops.lora)
  // that calls composed ATen ops under a torch.autograd.Function on CPU, or the
  // Triton kernels, which are registered from Python with torch.library.custom_op
  // as llmopt_ext::lora_linear_triton_fwd / _bwd (llmopt_ext/ops/triton/lora.py).
  m.def(
      "lora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, Tensor scaling, "
      "bool fan_in_fan_out=False) -> ()");
  m.def(
      "lora_unmerge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, Tensor scaling, "
      "bool fan_in_fan_out=False) -> ()");

  // ---- random Stiefel matrices / orthonormalisation (llmopt_ext/ops/stiefel.py)
  m.def("philox_normal_(Tensor(a!) out, int seed, int offset) -> ()");
  m.def("orthonormalize(Tensor X) -> Tensor");
}

#ifndef LLMOPT_WITH_CUDA
#define LLMOPT_WITH_CUDA 0
#endif
#ifdef _OPENMP
#define LLMOPT_WITH_OPENMP 1
#else
#define LLMOPT_WITH_OPENMP 0
#endif
#ifndef LLMOPT_TORCH_VERSION
#define LLMOPT_TORCH_VERSION "unknown"
#endif

static PyModuleDef llmopt_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled kernels of llmopt_ext; importing it registers torch.ops.llmopt_ext.*", -1, nullptr,
    nullptr, nullptr, nullptr, nullptr,  // m_slots, m_traverse, m_clear, m_free (-Wextra)
};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&llmopt_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "with_cuda", LLMOPT_WITH_CUDA) < 0 ||
      PyModule_AddIntConstant(m, "with_openmp", LLMOPT_WITH_OPENMP) < 0 ||
      PyModule_AddStringConstant(m, "torch_version", LLMOPT_TORCH_VERSION) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
