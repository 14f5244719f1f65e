"""Argument checks of the LoRA ops for the Python paths (reference, Triton, composed ATen),
worded like the C++ checks in csrc/torch/lora_args.h. Every check runs before anything is
computed or written."""
from __future__ import annotations

import torch

from ._checks import KERNEL_DTYPES

_DTYPE_MSG = "expected torch.float32, torch.bfloat16 or torch.float16"


def _tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; {_DTYPE_MSG}")


def check_scaling(op: str, scaling, device: torch.device) -> None:
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1:
            raise ValueError(f"{op}: scaling must be a number or a tensor with one element")
        if not scaling.dtype.is_floating_point:
            raise TypeError(f"{op}: scaling has dtype {scaling.dtype}; expected a floating-point scalar")
        if scaling.device.type != "cpu" and scaling.device != device:
            raise ValueError(f"{op}: scaling is on {scaling.device} but weight is on {device}")
    elif isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{op}: scaling must be a float or a one-element tensor, got {type(scaling).__name__}")


def check_adapter(op: str, weight, lora_A, lora_B, fan_in_fan_out: bool) -> tuple[int, int, int]:
    """Checks weight / lora_A / lora_B; returns (in_features, out_features, r)."""
    _tensor(op, "weight", weight)
    _tensor(op, "lora_A", lora_A)
    _tensor(op, "lora_B", lora_B)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D, got {weight.dim()}-D")
    if lora_A.dim() != 2:
        raise ValueError(f"{op}: lora_A must be 2-D (r, in_features), got {lora_A.dim()}-D")
    if lora_B.dim() != 2:
        raise ValueError(f"{op}: lora_B must be 2-D (out_features, r), got {lora_B.dim()}-D")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"{op}: lora_B has dtype {lora_B.dtype} but lora_A has {lora_A.dtype}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}")
    r = lora_A.shape[0]
    if lora_B.shape[1] != r:
        raise ValueError(f"{op}: rank mismatch: lora_A has r={r} rows but lora_B has {lora_B.shape[1]} columns")
    out_f, in_f = lora_B.shape[0], lora_A.shape[1]
    want = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    if tuple(weight.shape) != want:
        extra = " and fan_in_fan_out=True expects (in, out)" if fan_in_fan_out else ""
        raise ValueError(
            f"{op}: weight has shape ({weight.shape[0]}, {weight.shape[1]}) but lora_B x lora_A is "
            f"({out_f}, {in_f}){extra}"
        )
    return in_f, out_f, r


def check_merge(op: str, weight, lora_A, lora_B, scaling, fan_in_fan_out: bool) -> None:
    check_adapter(op, weight, lora_A, lora_B, fan_in_fan_out)
    check_scaling(op, scaling, weight.device)
    if torch._debug_has_internal_overlap(weight) == 1:
        raise ValueError(
            f"{op}: weight has overlapping memory (e.g. an expanded tensor) and cannot be written in place"
        )


def check_linear(op: str, x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out: bool) -> None:
    _tensor(op, "x", x)
    in_f, out_f, _ = check_adapter(op, weight, lora_A, lora_B, fan_in_fan_out)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension")
    if x.shape[-1] != in_f:
        raise ValueError(f"{op}: x's last dimension is {x.shape[-1]} but in_features is {in_f}")
    if in_f == 0:  # every backend: the GEMMs would take it, the Triton grids would not
        raise ValueError(f"{op}: in_features is 0 (x, weight and lora_A have no input features)")
    if x.dtype != weight.dtype:
        raise TypeError(f"{op}: x has dtype {x.dtype} but weight has {weight.dtype}; they must match")
    if lora_A.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{op}: lora_A has dtype {lora_A.dtype}; expected torch.float32 or x's dtype {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{op}: x is on {x.device} but weight is on {weight.device}")
    if bias is not None:
        _tensor(op, "bias", bias)
        if bias.shape != (out_f,):
            raise ValueError(f"{op}: bias has shape {tuple(bias.shape)} but out_features is {out_f}")
        if bias.device != weight.device:
            raise ValueError(f"{op}: bias is on {bias.device} but weight is on {weight.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias has dtype {bias.dtype} but x has {x.dtype}")
    check_scaling(op, scaling, weight.device)
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
