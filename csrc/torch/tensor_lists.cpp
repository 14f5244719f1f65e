#include "tensor_lists.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>

namespace llmopt_ext {
namespace {

// torch-style dtype names ("torch.float32"), so C++ and Python errors read the same.
std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

std::optional<DType> kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: return std::nullopt;
  }
}

// The bytes tensor i of list `list` can touch: [begin, end).
struct Span {
  uintptr_t begin, end;
  size_t list, index;
};

bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.const_data_ptr() == b.const_data_ptr() && a.sizes().equals(b.sizes()) &&
         a.strides().equals(b.strides()) && a.scalar_type() == b.scalar_type();
}

bool may_alias(const ListArg& read, const ListArg& written) {
  return !read.written && read.may_alias != nullptr && std::strcmp(read.may_alias, written.name) == 0;
}

// Whether tensor a.index of list a.list and tensor b.index of list b.list,
// whose byte ranges overlap, may share memory.
bool may_share(const std::vector<ListArg>& lists, const Span& a, const Span& b) {
  const ListArg& la = lists[a.list];
  const ListArg& lb = lists[b.list];
  if (!la.written && !lb.written) return true;
  return a.index == b.index && same_view(la.tensors[a.index], lb.tensors[b.index]) &&
         (may_alias(la, lb) || may_alias(lb, la));
}

}  // namespace

void check_no_alias(const char* op, const std::vector<ListArg>& lists) {
  if (std::none_of(lists.begin(), lists.end(), [](const ListArg& l) { return l.written; })) return;
  std::vector<Span> spans;
  for (size_t l = 0; l < lists.size(); ++l) {
    for (size_t i = 0; i < lists[l].tensors.size(); ++i) {
      const at::Tensor& t = lists[l].tensors[i];
      if (!t.defined() || t.numel() == 0) continue;
      int64_t extent = 0;  // strides are >= 0 in torch
      for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
      const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      spans.push_back({begin, begin + static_cast<uintptr_t>((extent + 1) * t.element_size()), l, i});
    }
  }
  // Sorted by first byte, each span is compared only with the spans that start
  // before it ends: O(n log n) for lists without sharing.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin
                              : (a.end != b.end ? a.end < b.end
                                                : (a.list != b.list ? a.list < b.list : a.index < b.index));
  });
  // The first conflicting pair in argument order (list, index), whatever the addresses.
  using Arg = std::pair<size_t, size_t>;
  std::optional<std::pair<Arg, Arg>> first;
  for (size_t k = 0; k < spans.size(); ++k) {
    for (size_t m = k + 1; m < spans.size() && spans[m].begin < spans[k].end; ++m) {
      if (may_share(lists, spans[k], spans[m])) continue;
      Arg a{spans[k].list, spans[k].index}, b{spans[m].list, spans[m].index};
      if (b < a) std::swap(a, b);
      if (!first || std::make_pair(a, b) < *first) first = std::make_pair(a, b);
    }
  }
  if (!first) return;
  const auto& [a, b] = *first;
  TORCH_CHECK_VALUE(false, op, ": ", lists[a.first].name, "[", a.second, "] and ",
                    lists[b.first].name, "[", b.second,
                    "] share memory, and one of them is written in place; the result would "
                    "depend on the backend's order of reads and writes (pass separate tensors, "
                    "e.g. a .clone())");
}

PreparedLists prepare_lists(const char* op, std::initializer_list<ListArg> lists,
                            bool alias_check) {
  TORCH_CHECK(lists.size() > 0, op, ": no tensor lists");
  const ListArg& first = *lists.begin();
  TORCH_CHECK_VALUE(!first.tensors.empty(), op, ": ", first.name, " is an empty list");
  const at::Tensor& t0 = first.tensors[0];
  const size_t n = first.tensors.size();

  PreparedLists p;
  p.device = t0.device();
  const auto kdt = kernel_dtype(t0.scalar_type());
  // Validate everything first: nothing may be written if any check fails.
  for (const ListArg& l : lists) {
    TORCH_CHECK_VALUE(l.tensors.size() == n, op, ": ", l.name, " has ", l.tensors.size(),
                      " tensors but ", first.name, " has ", n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = l.tensors[i];
      TORCH_CHECK_VALUE(t.defined(), op, ": ", l.name, "[", i, "] is undefined");
      TORCH_CHECK_TYPE(kernel_dtype(t.scalar_type()).has_value(), op, ": ", l.name, "[", i,
                       "] has dtype ", dtype_str(t.scalar_type()),
                       "; expected torch.float32, torch.bfloat16 or torch.float16");
      TORCH_CHECK_TYPE(t.scalar_type() == t0.scalar_type(), op, ": ", l.name, "[", i,
                       "] has dtype ", dtype_str(t.scalar_type()), " but ", first.name,
                       "[0] has ", dtype_str(t0.scalar_type()),
                       "; all tensors must share one dtype");
      TORCH_CHECK_VALUE(t.device() == p.device, op, ": ", l.name, "[", i, "] is on ", t.device(),
                        " but ", first.name, "[0] is on ", p.device);
      const at::Tensor& ref = first.tensors[i];
      TORCH_CHECK_VALUE(t.sizes().equals(ref.sizes()), op, ": ", l.name, "[", i, "] has shape ",
                        shape_str(t.sizes()), " but ", first.name, "[", i, "] has shape ",
                        shape_str(ref.sizes()));
      if (l.written) {
        TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": ", l.name,
                          "[", i, "] has overlapping memory (e.g. an expanded tensor) and cannot ",
                          "be written in place");
      }
    }
  }

  if (alias_check) check_no_alias(op, std::vector<ListArg>(lists));

  p.dtype = *kdt;
  p.numels.reserve(n);
  for (size_t i = 0; i < n; ++i) p.numels.push_back(first.tensors[i].numel());
  for (const ListArg& l : lists) {
    std::vector<at::Tensor> keep;
    std::vector<const void*> ptrs;
    keep.reserve(n);
    ptrs.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = l.tensors[i];
      at::Tensor c = t.is_contiguous() ? t : t.contiguous();
      if (l.written && !t.is_contiguous()) p.copy_back_.emplace_back(t, c);
      ptrs.push_back(c.data_ptr());
      keep.push_back(std::move(c));
    }
    p.keep_.push_back(std::move(keep));
    p.ptrs_.push_back(std::move(ptrs));
  }
  return p;
}

void PreparedLists::finish() {
  for (auto& [user, tmp] : copy_back_) user.copy_(tmp);
  copy_back_.clear();
}

ScalarValue scalar_value(const char* op, const char* name, const at::Tensor& s,
                         const at::Device& device) {
  TORCH_CHECK_VALUE(s.defined() && s.numel() == 1, op, ": ", name,
                    " must be a number or a tensor with one element");
  TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()), op, ": ", name, " has dtype ",
                   dtype_str(s.scalar_type()), "; expected a floating-point scalar");
  if (s.device().is_cpu()) {
    // Read as double so a finite float64 value beyond float32's range (e.g. 1e300)
    // is a clear error naming the argument, not c10's "cannot be converted" message.
    const double v = s.item<double>();
    const float f = static_cast<float>(v);
    TORCH_CHECK_VALUE(!std::isfinite(v) || std::isfinite(f), op, ": ", name, " = ", v,
                      " overflows torch.float32 (scalars are rounded to float32)");
    return {f, nullptr};
  }
  TORCH_CHECK_VALUE(s.device() == device, op, ": ", name, " is on ", s.device(),
                    " but the tensor lists are on ", device);
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, op, ": ", name,
                   " on the device must be torch.float32 (it is read by the kernel), got ",
                   dtype_str(s.scalar_type()));
  return {0.0f, s.data_ptr<float>()};
}

}  // namespace llmopt_ext
