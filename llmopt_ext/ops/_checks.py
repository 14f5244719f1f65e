"""Argument checks shared by every path of the non-LoRA ops: the public wrappers
(llmopt_ext/ops/*.py), the pure-PyTorch reference and the fake (meta) implementations
registered for torch.compile. Worded as the C++ checks in csrc/torch/tensor_lists.cpp and
csrc/torch/optim_update_args.h, so an error reads the same whichever backend runs.

Checks use ``torch._check_value`` / ``torch._check_type`` (ValueError / TypeError with the
message below): on real tensors they are plain ``if not ok: raise``, and inside a fake
implementation they also work on symbolic shapes.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# One list argument: (name, tensors, written) or (name, tensors, written, may_alias), where
# may_alias names a written list whose tensor i this read-only list may BE at index i
# (mt_axpby_(ys, ys, ...)); see check_no_alias.
ListSpec = tuple


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


# The messages are lambdas: formatted only on failure (the reference checks every tensor).
_check_value = torch._check_value  # ValueError
_check_type = torch._check_type  # TypeError


# ---------------------------------------------------------------------------
# the wrappers' coercions (run for every backend, before dispatch)

def as_list(op: str, name: str, value) -> list[torch.Tensor]:
    """`value` as a list of tensors; a tensor, a non-sequence or a non-tensor element
    (e.g. None) is a TypeError naming the element."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(value).__name__}")
    out = list(value)
    if not all(map(isinstance, out, itertools.repeat(torch.Tensor))):  # a C loop: ~1 us per 200
        i, t = next((i, t) for i, t in enumerate(out) if not isinstance(t, torch.Tensor))
        raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a tensor")
    return out


def optional_list(op: str, name: str, value) -> list[torch.Tensor] | None:
    return None if value is None else as_list(op, name, value)


def first_tensor(op: str, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """tensors[0] (it decides the backend), or the error for an empty list."""
    if not tensors:
        raise ValueError(f"{op}: {name} is an empty list")
    return tensors[0]


def check_float32_range(op: str, name: str, v: float) -> None:
    """A finite value that rounds to +-inf in float32 (e.g. 1e300) is rejected rather than
    silently becoming inf (the kernels read every scalar as float32)."""
    if math.isfinite(v) and abs(v) > FLOAT32_MAX and math.isinf(float(torch.tensor(v).float())):
        raise ValueError(f"{op}: {name} = {v:g} overflows torch.float32 (scalars are rounded to float32)")


def scalar(op: str, name: str, value, *, host: bool = False):
    """The one coercion of a scalar argument, for every op.

    host=False (a ``Tensor`` in the schema): a Python number becomes a CPU float32 tensor
    (read on the host by every backend: no sync); a tensor is passed through, its value
    checked by the backend (reading it here would sync and break torch.compile graphs).
    host=True (a ``float`` in the schema): a Python number or a one-element CPU tensor,
    returned as a Python float.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        check_float32_range(op, name, float(value))
        return float(value) if host else torch.tensor(float(value), dtype=torch.float32)
    if isinstance(value, torch.Tensor):
        if not host:
            return value
        if value.numel() == 1 and value.device.type == "cpu":
            return scalar(op, name, value.item(), host=True)
        raise TypeError(f"{op}: {name} must be a float or a one-element CPU tensor, got a tensor of "
                        f"shape {_shape(value)} on {value.device}")
    want = "a float" if host else "a float or a one-element tensor"
    raise TypeError(f"{op}: {name} must be {want}, got {type(value).__name__}")


def check_written_grad(op: str, lists: Sequence[ListSpec]) -> None:
    """The ops write outside autograd: with grad mode on, a written tensor that requires
    grad is rejected on every backend (the reference's copy_ would raise for a leaf and
    record a graph otherwise; the C++ kernels would write silently). Optimizers call the
    ops under torch.no_grad(), where this is allowed."""
    if not torch.is_grad_enabled():
        return
    for name, tensors, written, *_ in lists:
        if written:
            for i, t in enumerate(tensors):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    raise RuntimeError(
                        f"{op}: {name}[{i}] requires grad and would be written in place outside "
                        "autograd; call the op under torch.no_grad() (as optimizers do) or pass "
                        "a detached tensor")


# ---------------------------------------------------------------------------
# lists (reference, fakes; C++: prepare_lists)

def check_lists(op: str, lists: Sequence[ListSpec]) -> None:
    """Same rules as prepare_lists() in C++: the first list is non-empty, every list as long,
    tensor i of every list shaped as tensor i of the first, one kernel dtype, one device,
    written tensors without internal overlap."""
    first_name, first = lists[0][0], lists[0][1]
    _check_value(len(first) > 0, lambda: f"{op}: {first_name} is an empty list")
    t0 = first[0]
    for name, tensors, written, *_ in lists:
        _check_value(len(tensors) == len(first), lambda:
                     f"{op}: {name} has {len(tensors)} tensors but {first_name} has {len(first)}")
        for i, t in enumerate(tensors):
            _check_type(isinstance(t, torch.Tensor), lambda:
                        f"{op}: {name}[{i}] is a {type(t).__name__}, not a tensor")
            _check_type(t.dtype in KERNEL_DTYPES, lambda: f"{op}: {name}[{i}] has dtype {t.dtype}; expected "
                        "torch.float32, torch.bfloat16 or torch.float16")
            _check_type(t.dtype == t0.dtype, lambda:
                        f"{op}: {name}[{i}] has dtype {t.dtype} but {first_name}[0] "
                        f"has {t0.dtype}; all tensors must share one dtype")
            _check_value(t.device == t0.device, lambda:
                         f"{op}: {name}[{i}] is on {t.device} but {first_name}[0] "
                         f"is on {t0.device}")
            _check_value(t.shape == first[i].shape, lambda: f"{op}: {name}[{i}] has shape {_shape(t)} but "
                         f"{first_name}[{i}] has shape {_shape(first[i])}")
            if written:
                _check_value(not _has_internal_overlap(t), lambda:
                             f"{op}: {name}[{i}] has overlapping memory "
                             "(e.g. an expanded tensor) and cannot be written in place")


def _has_internal_overlap(t: torch.Tensor) -> bool:
    # torch._debug_has_internal_overlap: 0 no, 1 yes, 2 too hard to tell (treated as no, like C++)
    return torch._debug_has_internal_overlap(t) == 1


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] that t can touch (strides are >= 0 in torch)."""
    start = t.data_ptr()
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size()


def check_no_alias(op: str, lists: Sequence[ListSpec]) -> None:
    """A written tensor may share no memory with any other tensor argument: the reference
    (list by list) and the kernels (element by element, or through contiguous temporaries)
    would otherwise read different values. One exception: a read-only list declared
    ``may_alias=W`` may hold, at index i, the very tensor W[i] (same first element, shape
    and strides). Memory is compared by byte ranges, so two interleaved views that touch
    disjoint elements (t[::2], t[1::2]) are rejected too. Same rule as check_no_alias() in
    csrc/torch/tensor_lists.cpp."""
    if not any(spec[2] for spec in lists):
        return
    spans = []
    for li, (name, tensors, written, *rest) in enumerate(lists):
        for i, t in enumerate(tensors):
            if t.numel() > 0 and t.device.type != "meta":
                spans.append((*_byte_span(t), li, i))
    spans.sort()
    conflicts = []
    for k, (start, end, li, i) in enumerate(spans):
        for start2, _end2, lj, j in spans[k + 1:]:
            if start2 >= end:
                break
            if not _may_share(lists, (li, i), (lj, j)):
                conflicts.append(tuple(sorted([(li, i), (lj, j)])))
    if conflicts:  # the first pair in argument order, whatever the addresses
        (la, i), (lb, j) = min(conflicts)
        raise ValueError(
            f"{op}: {lists[la][0]}[{i}] and {lists[lb][0]}[{j}] share memory, and one of them is "
            "written in place; the result would depend on the backend's order of reads and writes "
            "(pass separate tensors, e.g. a .clone())")


def _may_share(lists, a: tuple[int, int], b: tuple[int, int]) -> bool:
    (la, i), (lb, j) = a, b
    name_a, ts_a, w_a, *alias_a = lists[la]
    name_b, ts_b, w_b, *alias_b = lists[lb]
    if not (w_a or w_b):
        return True
    ta, tb = ts_a[i], ts_b[j]
    same_view = (i == j and ta.data_ptr() == tb.data_ptr() and ta.shape == tb.shape
                 and ta.stride() == tb.stride() and ta.dtype == tb.dtype)
    return same_view and ((not w_b and alias_b[:1] == [name_a]) or (not w_a and alias_a[:1] == [name_b]))


def check_scalar(op: str, name: str, s: torch.Tensor, device: torch.device, *, read: bool = True) -> None:
    """A one-element floating tensor: on the CPU (read on the host; any lists' device) or on
    the lists' device as float32 (read by the kernel). read=False (fakes) skips the value
    check, which needs the data."""
    _check_value(s.numel() == 1, lambda: f"{op}: {name} must be a number or a tensor with one element")
    _check_type(s.dtype.is_floating_point, lambda:
                f"{op}: {name} has dtype {s.dtype}; expected a floating-point scalar")
    if s.device.type != "cpu":
        _check_value(s.device == device, lambda:
                     f"{op}: {name} is on {s.device} but the tensor lists are on {device}")
        _check_type(s.dtype == torch.float32, lambda:
                    f"{op}: {name} on the device must be torch.float32 (it is read "
                    f"by the kernel), got {s.dtype}")
    elif read:
        check_float32_range(op, name, float(s.reshape(()).double()))


# ---------------------------------------------------------------------------
# fused optimizer updates: same rules and words as csrc/torch/optim_update_args.h

def check_optim_args(op: str, param_lists, state_lists) -> None:
    """param_lists: params (+ grads), one dtype; state_lists: float32, the params' shapes."""
    check_dense(op, [*param_lists, *state_lists])
    p_name, params = param_lists[0][0], param_lists[0][1]
    for name, tensors, *_ in state_lists:
        _check_value(len(tensors) == len(params), lambda:
                     f"{op}: {name} has {len(tensors)} tensors but {p_name} has {len(params)}")
        for i, t in enumerate(tensors):
            _check_type(isinstance(t, torch.Tensor), lambda:
                        f"{op}: {name}[{i}] is a {type(t).__name__}, not a tensor")
            _check_type(t.dtype == torch.float32, lambda:
                        f"{op}: {name}[{i}] has dtype {t.dtype}; optimizer state must be torch.float32")
            p = params[i]
            if isinstance(p, torch.Tensor):
                _check_value(t.shape == p.shape, lambda:
                             f"{op}: {name}[{i}] has shape {_shape(t)} but {p_name}[{i}] "
                             f"has shape {_shape(p)}")
                _check_value(t.device == p.device, lambda:
                             f"{op}: {name}[{i}] is on {t.device} but {p_name}[{i}] "
                             f"is on {p.device}")
    check_lists(op, list(param_lists))
    check_lists(op, list(state_lists))


def check_dense(op: str, lists: Sequence[ListSpec]) -> None:
    """Only strided tensors. The wrappers run this before dispatch too: the dispatcher would
    send a sparse tensor to a SparseCPU/SparseCUDA kernel that does not exist."""
    for name, tensors, *_ in lists:
        for i, t in enumerate(tensors):
            if isinstance(t, torch.Tensor) and t.layout != torch.strided:
                raise ValueError(f"{op}: {name}[{i}] is sparse; only dense (strided) tensors are supported")


def check_hyper(op: str, name: str, v: float, ok: bool, want: str) -> None:
    if not (math.isfinite(v) and ok):
        raise ValueError(f"{op}: {name} = {v:g}; expected {want}")
    check_float32_range(op, name, v)


def check_sophia_hyper(lr, beta1, rho, weight_decay, eps) -> None:
    op = "sophia_update_"
    check_hyper(op, "lr", lr, lr >= 0, "a finite value >= 0")
    check_hyper(op, "beta1", beta1, 0 <= beta1 < 1, "a value in [0, 1)")
    check_hyper(op, "rho", rho, rho > 0, "a finite value > 0")
    check_hyper(op, "weight_decay", weight_decay, weight_decay >= 0, "a finite value >= 0")
    check_hyper(op, "eps", eps, eps >= 0, "a finite value >= 0")


def check_adahessian_hyper(lr, beta1, beta2, weight_decay, eps, hessian_power) -> None:
    op = "adahessian_update_"
    check_hyper(op, "lr", lr, lr >= 0, "a finite value >= 0")
    check_hyper(op, "beta1", beta1, 0 <= beta1 < 1, "a value in [0, 1)")
    check_hyper(op, "beta2", beta2, 0 <= beta2 < 1, "a value in [0, 1)")
    check_hyper(op, "weight_decay", weight_decay, weight_decay >= 0, "a finite value >= 0")
    check_hyper(op, "eps", eps, eps >= 0, "a finite value >= 0")
    check_hyper(op, "hessian_power", hessian_power, 0 < hessian_power <= 1, "a value in (0, 1]")


def check_step_value(op: str, t: float) -> None:
    """AdaHessian's step number t: >= 1 (NaN is rejected: ``not nan >= 1``)."""
    if not t >= 1.0:
        raise ValueError(f"{op}: step = {t:g}; expected >= 1")


# ---------------------------------------------------------------------------
# Stiefel ops: same rules and words as csrc/torch/stiefel_args.h

def check_philox_normal(out: torch.Tensor, seed: int, offset: int) -> None:
    op = "philox_normal_"
    _check_type(out.dtype == torch.float32, lambda:
                f"{op}: out has dtype {out.dtype}; expected torch.float32")
    _check_value(out.is_contiguous(), lambda: f"{op}: out must be contiguous")
    _check_value(seed >= 0 and offset >= 0, lambda:
                 f"{op}: seed and offset must be >= 0, got {seed}, {offset}")


def check_orthonormalize(x: torch.Tensor) -> None:
    """X: a tall (m >= r >= 1) float32 / bfloat16 / float16 matrix."""
    op = "orthonormalize"
    _check_type(isinstance(x, torch.Tensor), lambda: f"{op}: X must be a tensor, got {type(x).__name__}")
    _check_value(x.dim() == 2, lambda: f"{op}: X must be a 2-D matrix, got shape {tuple(x.shape)}")
    _check_type(x.dtype in KERNEL_DTYPES, lambda:
                f"{op}: X has dtype {x.dtype}; expected torch.float32, torch.bfloat16 or torch.float16")
    _check_value(x.shape[1] >= 1, lambda:
                 f"{op}: X must have at least one column, got shape {tuple(x.shape)}")
    _check_value(x.shape[0] >= x.shape[1], lambda: f"{op}: X must be tall (rows >= columns), got shape "
                 f"{tuple(x.shape)}; orthonormalize the transpose for a wide matrix")
