"""Argument checks for the Python paths (reference, Triton), worded as the C++ checks in
csrc/torch/tensor_lists.cpp so an error reads the same whichever backend runs."""
from __future__ import annotations

import math
from typing import Sequence

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def as_list(op: str, name: str, value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(value).__name__}")
    return list(value)


def check_lists(op: str, lists: Sequence[tuple[str, Sequence[torch.Tensor], bool]]) -> None:
    """lists: (name, tensors, written). Same rules as prepare_lists() in C++."""
    first_name, first, _ = lists[0]
    if len(first) == 0:
        raise ValueError(f"{op}: {first_name} is an empty list")
    t0 = first[0]
    for name, tensors, written in lists:
        if len(tensors) != len(first):
            raise ValueError(f"{op}: {name} has {len(tensors)} tensors but {first_name} has {len(first)}")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a tensor")
            if t.dtype not in KERNEL_DTYPES:
                raise TypeError(
                    f"{op}: {name}[{i}] has dtype {t.dtype}; expected torch.float32, "
                    "torch.bfloat16 or torch.float16"
                )
            if t.dtype != t0.dtype:
                raise TypeError(
                    f"{op}: {name}[{i}] has dtype {t.dtype} but {first_name}[0] has {t0.dtype}; "
                    "all tensors must share one dtype"
                )
            if t.device != t0.device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {first_name}[0] is on {t0.device}")
            if t.shape != first[i].shape:
                raise ValueError(
                    f"{op}: {name}[{i}] has shape {_shape(t)} but {first_name}[{i}] has shape "
                    f"{_shape(first[i])}"
                )
            if written and _has_internal_overlap(t):
                raise ValueError(
                    f"{op}: {name}[{i}] has overlapping memory (e.g. an expanded tensor) and cannot "
                    "be written in place"
                )


def _has_internal_overlap(t: torch.Tensor) -> bool:
    # torch._debug_has_internal_overlap: 0 no, 1 yes, 2 too hard to tell (treated as no, like C++)
    return torch._debug_has_internal_overlap(t) == 1


def check_scalar(op: str, name: str, s: torch.Tensor, device: torch.device) -> None:
    if s.numel() != 1:
        raise ValueError(f"{op}: {name} must be a number or a tensor with one element")
    if not s.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} has dtype {s.dtype}; expected a floating-point scalar")
    if s.device.type != "cpu":
        if s.device != device:
            raise ValueError(f"{op}: {name} is on {s.device} but the tensor lists are on {device}")
        if s.dtype != torch.float32:
            raise TypeError(
                f"{op}: {name} on the device must be torch.float32 (it is read by the kernel), got {s.dtype}"
            )


# ---- fused optimizer updates: same rules and words as csrc/torch/optim_update_args.h

def check_optim_args(op: str, param_lists, state_lists) -> None:
    """param_lists: params (+ grads), one dtype; state_lists: float32, the params' shapes."""
    for name, tensors, _ in [*param_lists, *state_lists]:
        for i, t in enumerate(tensors):
            if isinstance(t, torch.Tensor) and t.layout != torch.strided:
                raise ValueError(f"{op}: {name}[{i}] is sparse; only dense (strided) tensors are supported")
    p_name, params, _ = param_lists[0]
    for name, tensors, _ in state_lists:
        if len(tensors) != len(params):
            raise ValueError(f"{op}: {name} has {len(tensors)} tensors but {p_name} has {len(params)}")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a tensor")
            if t.dtype != torch.float32:
                raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}; optimizer state must be torch.float32")
            p = params[i]
            if isinstance(p, torch.Tensor):
                if t.shape != p.shape:
                    raise ValueError(f"{op}: {name}[{i}] has shape {_shape(t)} but {p_name}[{i}] has shape "
                                     f"{_shape(p)}")
                if t.device != p.device:
                    raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {p_name}[{i}] is on {p.device}")
    check_lists(op, list(param_lists))
    check_lists(op, list(state_lists))


def _check_hyper(op: str, name: str, v: float, ok: bool, want: str) -> None:
    if not (math.isfinite(v) and ok):
        raise ValueError(f"{op}: {name} = {v:g}; expected {want}")


def check_sophia_hyper(lr, beta1, rho, weight_decay, eps) -> None:
    op = "sophia_update_"
    _check_hyper(op, "lr", lr, lr >= 0, "a finite value >= 0")
    _check_hyper(op, "beta1", beta1, 0 <= beta1 < 1, "a value in [0, 1)")
    _check_hyper(op, "rho", rho, rho > 0, "a finite value > 0")
    _check_hyper(op, "weight_decay", weight_decay, weight_decay >= 0, "a finite value >= 0")
    _check_hyper(op, "eps", eps, eps >= 0, "a finite value >= 0")


def check_adahessian_hyper(lr, beta1, beta2, weight_decay, eps, hessian_power) -> None:
    op = "adahessian_update_"
    _check_hyper(op, "lr", lr, lr >= 0, "a finite value >= 0")
    _check_hyper(op, "beta1", beta1, 0 <= beta1 < 1, "a value in [0, 1)")
    _check_hyper(op, "beta2", beta2, 0 <= beta2 < 1, "a value in [0, 1)")
    _check_hyper(op, "weight_decay", weight_decay, weight_decay >= 0, "a finite value >= 0")
    _check_hyper(op, "eps", eps, eps >= 0, "a finite value >= 0")
    _check_hyper(op, "hessian_power", hessian_power, 0 < hessian_power <= 1, "a value in (0, 1]")
