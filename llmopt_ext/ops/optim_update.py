"""Fused multi-tensor optimizer updates for curvature-aware optimizers (Sophia, AdaHessian).

The public implementations of these optimizers loop over parameters in Python with
several PyTorch ops per tensor (6-10 launches and as many passes over memory); these ops
update whole lists in one pass, reading and writing each element once.

Parameters and gradients share one dtype (float32, bfloat16 or float16); the optimizer
state lists (``exp_avgs``, ``exp_hessian_diag_sqs``, ``hessians``) are float32 with the
parameters' shapes. Math is float32 and each parameter is rounded once into its dtype
(see :func:`llmopt_ext.ops.reference.sophia_update_` for the exact order of operations).

``grad_scale`` / ``found_inf`` are the one-element float32 tensors torch's ``GradScaler``
hands to optimizers with ``_step_supports_amp_scaling``: gradients are divided by
``grad_scale`` and the whole update is skipped when ``found_inf != 0``; on GPU both are
read by the kernel (no host sync).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import backend
from . import reference
from ._checks import as_list

TensorList = Sequence[torch.Tensor]

_BACKENDS = ("cuda", "cpu", "reference")
for _name in ("sophia_update_", "adahessian_update_"):
    backend.register_op(_name, _BACKENDS)


def _impl(op: str, params: list[torch.Tensor]) -> Callable:
    if not params:
        raise ValueError(f"{op}: params is an empty list")
    if not isinstance(params[0], torch.Tensor):
        raise TypeError(f"{op}: params[0] is a {type(params[0]).__name__}, not a tensor")
    if backend.select(op, params[0].device) == "reference":
        return getattr(reference, op)
    return getattr(torch.ops.llmopt_ext, op).default


def _check_dense(op: str, **lists) -> None:
    # The dispatcher would route a sparse tensor to a SparseCPU/SparseCUDA kernel that does
    # not exist; say what is wrong instead.
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if isinstance(t, torch.Tensor) and t.layout != torch.strided:
                raise ValueError(f"{op}: {name}[{i}] is sparse; only dense (strided) tensors are supported")


def _number(op: str, name: str, v) -> float:
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.device.type == "cpu":
        return float(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")


def _step_tensor(op: str, step, device: torch.device) -> torch.Tensor:
    if isinstance(step, torch.Tensor):
        return step
    if isinstance(step, (int, float)) and not isinstance(step, bool):
        return torch.tensor(float(step), dtype=torch.float32)  # CPU: read on the host
    raise TypeError(f"{op}: step must be a number or a one-element tensor, got {type(step).__name__}")


def sophia_update_(
    params: TensorList,
    grads: TensorList,
    exp_avgs: TensorList,
    hessians: TensorList,
    *,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float = 0.0,
    eps: float = 1e-15,
    clip: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One fused Sophia step, in place on ``params`` and ``exp_avgs``.

    ``m <- beta1 m + (1 - beta1) g``, ``p <- p (1 - lr wd)``, then

    * SophiaG (``clip=False``, the official rule): ``p <- p - lr sign(m) min(|m| / (rho h + eps), 1)``
      where ``rho`` is the official code's ``rho * bs``;
    * SophiaH (``clip=True``): ``p <- p - lr clamp(m / max(h, eps), -rho, rho)``.

    ``hessians`` is the float32 Hessian-diagonal EMA ``h`` (updated by the optimizer).
    """
    op = "sophia_update_"
    params, grads = as_list(op, "params", params), as_list(op, "grads", grads)
    exp_avgs, hessians = as_list(op, "exp_avgs", exp_avgs), as_list(op, "hessians", hessians)
    _check_dense(op, params=params, grads=grads, exp_avgs=exp_avgs, hessians=hessians)
    fn = _impl(op, params)
    fn(params, grads, exp_avgs, hessians, _number(op, "lr", lr), _number(op, "beta1", beta1),
       _number(op, "rho", rho), _number(op, "weight_decay", weight_decay), _number(op, "eps", eps),
       bool(clip), grad_scale, found_inf)


def adahessian_update_(
    params: TensorList,
    grads: TensorList,
    exp_avgs: TensorList,
    exp_hessian_diag_sqs: TensorList,
    hessians: TensorList,
    *,
    step: float | torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float = 0.0,
    eps: float = 1e-4,
    hessian_power: float = 1.0,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One fused AdaHessian step, in place on ``params``, ``exp_avgs`` (m) and
    ``exp_hessian_diag_sqs`` (v), given the Hessian-diagonal estimate ``hessians`` (d):

    ``m <- beta1 m + (1 - beta1) g``; ``v <- beta2 v + (1 - beta2) d^2``;
    ``p <- p (1 - lr wd) - lr / (1 - beta1^t) * m / ((v / (1 - beta2^t))^(k/2) + eps)``.

    ``step`` is t (>= 1): a number, or a one-element float32 tensor on the params' device
    that the kernel reads (keeps a skipped AMP step from needing a host sync).
    ``grad_scale`` divides both g and d (both come from the scaled loss).
    """
    op = "adahessian_update_"
    params, grads = as_list(op, "params", params), as_list(op, "grads", grads)
    exp_avgs = as_list(op, "exp_avgs", exp_avgs)
    exp_hessian_diag_sqs = as_list(op, "exp_hessian_diag_sqs", exp_hessian_diag_sqs)
    hessians = as_list(op, "hessians", hessians)
    _check_dense(op, params=params, grads=grads, exp_avgs=exp_avgs,
                 exp_hessian_diag_sqs=exp_hessian_diag_sqs, hessians=hessians)
    fn = _impl(op, params)
    fn(params, grads, exp_avgs, exp_hessian_diag_sqs, hessians,
       _step_tensor(op, step, params[0].device), _number(op, "lr", lr), _number(op, "beta1", beta1),
       _number(op, "beta2", beta2), _number(op, "weight_decay", weight_decay), _number(op, "eps", eps),
       _number(op, "hessian_power", hessian_power), grad_scale, found_inf)
