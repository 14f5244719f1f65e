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

Every backend rejects the same inputs before writing anything: a written tensor that
requires grad while grad mode is on, one that shares memory with another argument, a
hyper-parameter that is not finite in float32, ``step`` < 1 or NaN.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _extension, backend
from ._checks import (as_list, check_adahessian_hyper, check_dense, check_optim_args, check_scalar,
                      check_sophia_hyper, check_step_value, check_written_grad, first_tensor, scalar)

TensorList = Sequence[torch.Tensor]

_BACKENDS = ("cuda", "cpu", "reference")
for _name in ("sophia_update_", "adahessian_update_"):
    backend.register_op(_name, _BACKENDS)


def _lists(op: str, **lists) -> list[list[torch.Tensor]]:
    """The list arguments as lists of tensors; params (the first) decides the backend."""
    out = [as_list(op, name, v) for name, v in lists.items()]
    check_dense(op, [(name, ts) for name, ts in zip(lists, out)])
    first_tensor(op, "params", out[0])
    return out


def _written_grad(op: str, params, *state) -> None:
    names = ("exp_avgs", "exp_hessian_diag_sqs")
    check_written_grad(op, [("params", params, True), *[(n, ts, True) for n, ts in zip(names, state)]])


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
    params, grads, exp_avgs, hessians = _lists(op, params=params, grads=grads, exp_avgs=exp_avgs,
                                               hessians=hessians)
    _written_grad(op, params, exp_avgs)
    hyper = [scalar(op, n, v, host=True) for n, v in
             (("lr", lr), ("beta1", beta1), ("rho", rho), ("weight_decay", weight_decay), ("eps", eps))]
    fn = backend.resolve(op, params[0].device)
    fn(params, grads, exp_avgs, hessians, *hyper, bool(clip), grad_scale, found_inf)


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
    params, grads, exp_avgs, exp_hessian_diag_sqs, hessians = _lists(
        op, params=params, grads=grads, exp_avgs=exp_avgs, exp_hessian_diag_sqs=exp_hessian_diag_sqs,
        hessians=hessians)
    _written_grad(op, params, exp_avgs, exp_hessian_diag_sqs)
    step_t = scalar(op, "step", step)
    if not isinstance(step, torch.Tensor):  # a tensor is checked by the backend (no sync here)
        check_step_value(op, float(step))
    hyper = [scalar(op, n, v, host=True) for n, v in
             (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("weight_decay", weight_decay), ("eps", eps),
              ("hessian_power", hessian_power))]
    fn = backend.resolve(op, params[0].device)
    fn(params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, step_t, *hyper, grad_scale, found_inf)


# ---------------------------------------------------------------------------
# fakes (torch.compile, FakeTensorMode, meta tensors): the reference's checks without
# reading any tensor's value; a meta tensor among CPU ones is dispatched here.

def _fake_amp(op: str, device, grad_scale, found_inf) -> None:
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            check_scalar(op, name, t, device, read=False)


def _fake_sophia_update_(params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps,
                         clip=False, grad_scale=None, found_inf=None):
    op = "sophia_update_"
    check_sophia_hyper(lr, beta1, rho, weight_decay, eps)
    check_optim_args(op, [("params", params, True), ("grads", grads, False)],
                     [("exp_avgs", exp_avgs, True), ("hessians", hessians, False)])
    _fake_amp(op, params[0].device, grad_scale, found_inf)


def _fake_adahessian_update_(params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, step, lr,
                             beta1, beta2, weight_decay, eps, hessian_power, grad_scale=None,
                             found_inf=None):
    op = "adahessian_update_"
    check_adahessian_hyper(lr, beta1, beta2, weight_decay, eps, hessian_power)
    check_optim_args(op, [("params", params, True), ("grads", grads, False)],
                     [("exp_avgs", exp_avgs, True), ("exp_hessian_diag_sqs", exp_hessian_diag_sqs, True),
                      ("hessians", hessians, False)])
    check_scalar(op, "step", step, params[0].device, read=False)
    _fake_amp(op, params[0].device, grad_scale, found_inf)


if _extension.loaded():  # _C defines the schemas the fakes attach to
    torch.library.register_fake("llmopt_ext::sophia_update_", _fake_sophia_update_)
    torch.library.register_fake("llmopt_ext::adahessian_update_", _fake_adahessian_update_)
