"""Multi-tensor vector ops for Hessian-free (Steihaug) conjugate gradients.

A LoRA model has hundreds of small parameter tensors. A CG iteration written with a
PyTorch op per tensor costs several kernel launches (and, in typical code, a host sync)
per tensor; these ops take whole lists and run in a bounded number of launches, with
scalars that stay on the device.

All lists of one call hold tensors of one dtype (float32, bfloat16 or float16) on one
device, tensor ``i`` of every list having the shape of tensor ``i`` of the first list.
Arithmetic is float64 inside, each stored element rounded once into its dtype, and
reductions return float32 tensors with no host sync. Scalars (``a``, ``b``, ``alpha``,
``beta``) are Python numbers or one-element tensors (a float32 tensor on the lists'
device is read by the kernel without a sync); they are rounded to float32.

Steihaug-CG with these ops, per iteration (one HVP, three vector-op launches)::

    pHp = mt_dot(p, Hp)                               # curvature along p
    norms = mt_cg_step_(x, r, p, Hp, rz / pHp, minv)  # x += a p, r += a Hp; ||x||^2, ||r||^2, r'z
    mt_cg_direction_(p, r, norms[2] / rz, minv)       # p = -M^-1 r + beta p
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import _extension, backend
from . import reference
from ._checks import as_list

Scalar = float | torch.Tensor
TensorList = Sequence[torch.Tensor]

_BACKENDS = ("cuda", "cpu", "reference")
for _name in ("mt_dot", "mt_norm_sq", "mt_axpby_", "mt_cg_step_", "mt_cg_direction_"):
    backend.register_op(_name, _BACKENDS)


def _impl(op: str, first: list[torch.Tensor], first_name: str) -> Callable:
    if not first:
        raise ValueError(f"{op}: {first_name} is an empty list")
    if not isinstance(first[0], torch.Tensor):
        raise TypeError(f"{op}: {first_name}[0] is a {type(first[0]).__name__}, not a tensor")
    chosen = backend.select(op, first[0].device)
    if chosen == "reference":
        return getattr(reference, op)
    return getattr(torch.ops.llmopt_ext, op).default


def _scalar(op: str, name: str, value: Scalar) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32)  # CPU: read on the host, no sync
    raise TypeError(f"{op}: {name} must be a float or a one-element tensor, got {type(value).__name__}")


def _optional_list(op: str, name: str, value) -> list[torch.Tensor] | None:
    return None if value is None else as_list(op, name, value)


def mt_dot(xs: TensorList, ys: TensorList) -> torch.Tensor:
    """Sum over the lists of the dot products ``<xs[i], ys[i]>``.

    Returns a 0-dim float32 tensor on the lists' device (no host sync).
    """
    xs, ys = as_list("mt_dot", "xs", xs), as_list("mt_dot", "ys", ys)
    return _impl("mt_dot", xs, "xs")(xs, ys)


def mt_norm_sq(xs: TensorList) -> torch.Tensor:
    """Squared 2-norm of the concatenation of ``xs``: ``sum_i ||xs[i]||^2`` (0-dim float32)."""
    xs = as_list("mt_norm_sq", "xs", xs)
    return _impl("mt_norm_sq", xs, "xs")(xs)


def mt_axpby_(ys: TensorList, xs: TensorList, a: Scalar, b: Scalar) -> None:
    """In place: ``ys[i] = a * xs[i] + b * ys[i]`` for every i. ``xs`` may be ``ys``."""
    op = "mt_axpby_"
    ys, xs = as_list(op, "ys", ys), as_list(op, "xs", xs)
    fn = _impl(op, ys, "ys")
    fn(ys, xs, _scalar(op, "a", a), _scalar(op, "b", b))


def mt_cg_step_(
    xs: TensorList,
    rs: TensorList,
    ps: TensorList,
    hps: TensorList,
    alpha: Scalar,
    minv: TensorList | None = None,
) -> torch.Tensor:
    """One fused CG update of the iterate and the residual.

    In place ``x += alpha * p`` and ``r += alpha * hp``, then returns a float32 tensor
    ``[||x||^2, ||r||^2, r^T M^-1 r]`` of the updated vectors, where ``M^-1 = diag(minv)``
    (a list shaped like ``xs``; the identity when None, and then the last entry equals
    ``||r||^2``). One pass over the data, no host sync.
    """
    op = "mt_cg_step_"
    xs, rs = as_list(op, "xs", xs), as_list(op, "rs", rs)
    ps, hps = as_list(op, "ps", ps), as_list(op, "hps", hps)
    fn = _impl(op, xs, "xs")
    return fn(xs, rs, ps, hps, _scalar(op, "alpha", alpha), _optional_list(op, "minv", minv))


def mt_cg_direction_(
    ps: TensorList, rs: TensorList, beta: Scalar, minv: TensorList | None = None
) -> None:
    """In place the new CG search direction: ``p = -(M^-1 r) + beta * p``
    (``M^-1 = diag(minv)``, the identity when None)."""
    op = "mt_cg_direction_"
    ps, rs = as_list(op, "ps", ps), as_list(op, "rs", rs)
    fn = _impl(op, ps, "ps")
    fn(ps, rs, _scalar(op, "beta", beta), _optional_list(op, "minv", minv))


def kernels_loaded() -> bool:
    """True when the compiled kernels (``llmopt_ext._C``) are loaded."""
    return _extension.loaded()
