"""Argument checks for the Python paths (reference, Triton), worded as the C++ checks in
csrc/torch/tensor_lists.cpp so an error reads the same whichever backend runs."""
from __future__ import annotations

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
