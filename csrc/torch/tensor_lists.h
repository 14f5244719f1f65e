// Argument checking and preparation for multi-tensor ops, shared by the CPU
// and CUDA glue. All checks run before anything is written, so a rejected
// call leaves every input untouched.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "../common/float_types.h"

namespace llmopt_ext {

// One list argument of an op: its name in the schema, the tensors, whether
// the op writes it, and (read-only lists) the name of a written list whose
// tensor i this list may be at index i (mt_axpby_'s xs may be its ys).
struct ListArg {
  const char* name;
  at::TensorList tensors;
  bool written;
  const char* may_alias = nullptr;
};

// The checked lists, as raw pointers for the kernels. Lists the op writes
// that are not contiguous are computed into contiguous temporaries and
// copied back by finish().
class PreparedLists {
 public:
  DType dtype;
  at::Device device{at::kCPU};
  std::vector<int64_t> numels;

  const void* const* in(size_t list) const { return ptrs_[list].data(); }
  void* const* out(size_t list) const { return const_cast<void* const*>(ptrs_[list].data()); }
  // Copies results of non-contiguous written tensors back into them.
  void finish();

 private:
  friend PreparedLists prepare_lists(const char* op, std::initializer_list<ListArg> lists,
                                     bool alias_check);
  std::vector<std::vector<at::Tensor>> keep_;         // keeps contiguous copies alive
  std::vector<std::vector<const void*>> ptrs_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back_;  // (user tensor, temporary)
};

// Checks that every list has as many tensors as the first (which must be
// non-empty), and that tensor i of every list has the shape of tensor i of the
// first list, one floating dtype (float32, bfloat16 or float16) and one device
// shared by all tensors of all lists, and (alias_check) check_no_alias.
// Errors name the op and the argument.
PreparedLists prepare_lists(const char* op, std::initializer_list<ListArg> lists,
                            bool alias_check = true);

// A written tensor may share no memory with any other tensor of `lists`
// (byte ranges compared, so interleaved views such as t[::2] / t[1::2] count
// as sharing): the kernels read and write element by element, or through
// contiguous temporaries, and the result would depend on that order. The one
// exception is ListArg::may_alias: the very same view (first element, sizes,
// strides) at the same index. Same rule and words as check_no_alias() in
// llmopt_ext/ops/_checks.py.
void check_no_alias(const char* op, const std::vector<ListArg>& lists);

// A scalar coefficient given as a tensor with one element: a CPU tensor is
// read on the host (free), a tensor on the lists' device must be float32 and
// is read by the kernel (no host sync).
struct ScalarValue {
  float value;
  const float* device_ptr;  // nullptr: use value
};
ScalarValue scalar_value(const char* op, const char* name, const at::Tensor& s,
                         const at::Device& device);

}  // namespace llmopt_ext
