// Argument lists of the multi-tensor ops, shared by the CPU and CUDA glue so
// both check the same things in the same order. List indices used by the
// glue: cg_step {0: xs, 1: rs, 2: ps, 3: hps, 4: minv}; cg_direction
// {0: ps, 1: rs, 2: minv}.
#pragma once

#include "tensor_lists.h"

namespace llmopt_ext {

// Schema type `Tensor[]?`.
using OptionalTensorList = std::optional<at::TensorList>;

inline PreparedLists prepare_cg_step(at::TensorList xs, at::TensorList rs, at::TensorList ps,
                                     at::TensorList hps, const OptionalTensorList& minv) {
  const char* op = "mt_cg_step_";
  if (minv.has_value())
    return prepare_lists(op, {{"xs", xs, true}, {"rs", rs, true}, {"ps", ps, false},
                              {"hps", hps, false}, {"minv", *minv, false}});
  return prepare_lists(op, {{"xs", xs, true}, {"rs", rs, true}, {"ps", ps, false},
                            {"hps", hps, false}});
}

inline PreparedLists prepare_cg_direction(at::TensorList ps, at::TensorList rs,
                                          const OptionalTensorList& minv) {
  const char* op = "mt_cg_direction_";
  if (minv.has_value())
    return prepare_lists(op, {{"ps", ps, true}, {"rs", rs, false}, {"minv", *minv, false}});
  return prepare_lists(op, {{"ps", ps, true}, {"rs", rs, false}});
}

}  // namespace llmopt_ext
