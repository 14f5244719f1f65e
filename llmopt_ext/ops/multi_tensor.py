"""Multi-tensor vector ops for Hessian-free (Steihaug) conjugate gradients.

A LoRA model has hundreds of small parameter tensors. A CG iteration written with a
PyTorch op per tensor costs several kernel launches (and, in typical code, a host sync)
per tensor; these ops take whole lists and run in a bounded number of launches, with
scalars that stay on the device.

All lists of one call hold tensors of one dtype (float32, bfloat16 or float16) on one
device, tensor ``i`` of every list having the shape of tensor ``i`` of the first list.
Reductions accumulate in float64 and return float32 tensors with no host sync.

Element-wise results (``mt_axpby_``, ``mt_cg_step_``, ``mt_cg_direction_``), by the
keyword ``exact`` (a bool, default False):

* float32 storage, whatever ``exact`` says: float64 math, each stored element rounded
  once into float32 (these ops are memory-bound there already).
* bfloat16/float16 storage, ``exact=True``: the same float64 math and single rounding
  into the 16-bit dtype (correctly rounded; compute-bound on CPUs, so opt-in).
* bfloat16/float16 storage, ``exact=False`` (default, fastest): float32 math, each
  product and sum rounded to float32 separately in the order written below (no FMA),
  then one round-to-nearest-even into the 16-bit dtype; the scalars are float32 and
  ``minv`` is loaded as float32::

      mt_axpby_:        y = R16( fl(fl(a*x) + fl(b*y)) )
      mt_cg_step_:      x = R16( fl(x + fl(alpha*p)) ),  r = R16( fl(r + fl(alpha*hp)) )
      mt_cg_direction_: z = minv ? fl(minv*r) : r,      p = R16( fl(fl(beta*p) - z) )

  ``mt_cg_step_``'s norms are the same on both paths: float64 sums over the stored,
  rounded values. CPU, CUDA and the reference give the same bits on either path.

Scalars (``a``, ``b``, ``alpha``, ``beta``) are Python numbers or one-element tensors (a
float32 tensor on the lists' device is read by the kernel without a sync); they are rounded
to float32, and a finite value beyond float32's range is an error.

In-place ops write outside autograd (call them under ``torch.no_grad()`` when a written
tensor requires grad), and a written tensor may share no memory with another argument,
except that ``mt_axpby_``'s ``xs`` may be its ``ys`` (see ``_checks.check_no_alias``).

Steihaug-CG with these ops, per iteration (one HVP, three vector-op launches)::

    pHp = mt_dot(p, Hp)                               # curvature along p
    norms = mt_cg_step_(x, r, p, Hp, rz / pHp, minv)  # x += a p, r += a Hp; ||x||^2, ||r||^2, r'z
    mt_cg_direction_(p, r, norms[2] / rz, minv)       # p = -M^-1 r + beta p
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _extension, backend
from ._checks import (as_list, check_lists, check_scalar, check_written_grad, first_tensor,
                      optional_list, scalar)

Scalar = float | torch.Tensor
TensorList = Sequence[torch.Tensor]

_BACKENDS = ("cuda", "cpu", "reference")
for _name in ("mt_dot", "mt_norm_sq", "mt_axpby_", "mt_cg_step_", "mt_cg_direction_"):
    backend.register_op(_name, _BACKENDS)


def mt_dot(xs: TensorList, ys: TensorList) -> torch.Tensor:
    """Sum over the lists of the dot products ``<xs[i], ys[i]>``.

    Returns a 0-dim float32 tensor on the lists' device (no host sync).
    """
    op = "mt_dot"
    xs, ys = as_list(op, "xs", xs), as_list(op, "ys", ys)
    return backend.resolve(op, first_tensor(op, "xs", xs).device)(xs, ys)


def mt_norm_sq(xs: TensorList) -> torch.Tensor:
    """Squared 2-norm of the concatenation of ``xs``: ``sum_i ||xs[i]||^2`` (0-dim float32)."""
    op = "mt_norm_sq"
    xs = as_list(op, "xs", xs)
    return backend.resolve(op, first_tensor(op, "xs", xs).device)(xs)


def _check_exact(op: str, exact) -> bool:
    if not isinstance(exact, bool):
        raise TypeError(f"{op}: exact must be a bool, got {type(exact).__name__}")
    return exact


def mt_axpby_(ys: TensorList, xs: TensorList, a: Scalar, b: Scalar, *, exact: bool = False) -> None:
    """In place: ``ys[i] = a * xs[i] + b * ys[i]`` for every i. ``xs`` may be ``ys``.

    bfloat16/float16: ``exact=False`` (default) computes ``R16(fl(fl(a*x) + fl(b*y)))`` in
    float32; ``exact=True`` rounds the float64 ``a*x + b*y`` once (see the module doc).
    """
    op = "mt_axpby_"
    exact = _check_exact(op, exact)
    ys, xs = as_list(op, "ys", ys), as_list(op, "xs", xs)
    check_written_grad(op, [("ys", ys, True)])
    fn = backend.resolve(op, first_tensor(op, "ys", ys).device)
    fn(ys, xs, scalar(op, "a", a), scalar(op, "b", b), exact=exact)


def mt_cg_step_(
    xs: TensorList,
    rs: TensorList,
    ps: TensorList,
    hps: TensorList,
    alpha: Scalar,
    minv: TensorList | None = None,
    *,
    exact: bool = False,
) -> torch.Tensor:
    """One fused CG update of the iterate and the residual.

    In place ``x += alpha * p`` and ``r += alpha * hp``, then returns a float32 tensor
    ``[||x||^2, ||r||^2, r^T M^-1 r]`` of the updated vectors, where ``M^-1 = diag(minv)``
    (a list shaped like ``xs``; the identity when None, and then the last entry equals
    ``||r||^2``). One pass over the data, no host sync.

    bfloat16/float16: ``exact=False`` (default) computes ``x = R16(fl(x + fl(alpha*p)))``
    and ``r = R16(fl(r + fl(alpha*hp)))`` in float32; ``exact=True`` rounds the float64
    results once. The norms are float64 sums of the stored values on both paths.
    """
    op = "mt_cg_step_"
    exact = _check_exact(op, exact)
    xs, rs = as_list(op, "xs", xs), as_list(op, "rs", rs)
    ps, hps = as_list(op, "ps", ps), as_list(op, "hps", hps)
    check_written_grad(op, [("xs", xs, True), ("rs", rs, True)])
    fn = backend.resolve(op, first_tensor(op, "xs", xs).device)
    return fn(xs, rs, ps, hps, scalar(op, "alpha", alpha), optional_list(op, "minv", minv), exact=exact)


def mt_cg_direction_(
    ps: TensorList, rs: TensorList, beta: Scalar, minv: TensorList | None = None, *,
    exact: bool = False,
) -> None:
    """In place the new CG search direction: ``p = -(M^-1 r) + beta * p``
    (``M^-1 = diag(minv)``, the identity when None).

    bfloat16/float16: ``exact=False`` (default) computes ``z = fl(minv*r)`` (or ``r``) and
    ``p = R16(fl(fl(beta*p) - z))`` in float32; ``exact=True`` rounds the float64 result once.
    """
    op = "mt_cg_direction_"
    exact = _check_exact(op, exact)
    ps, rs = as_list(op, "ps", ps), as_list(op, "rs", rs)
    check_written_grad(op, [("ps", ps, True)])
    fn = backend.resolve(op, first_tensor(op, "ps", ps).device)
    fn(ps, rs, scalar(op, "beta", beta), optional_list(op, "minv", minv), exact=exact)


# ---------------------------------------------------------------------------
# fakes (torch.compile, FakeTensorMode, meta tensors): the reference's checks without
# reading any value. A list holding one meta tensor among CPU tensors is dispatched here
# (Meta outranks CPU), so these checks are what rejects it on the compiled path.

def _reduction_out(xs: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=xs[0].device)


def _fake_mt_dot(xs, ys):
    check_lists("mt_dot", [("xs", xs, False), ("ys", ys, False)])
    return _reduction_out(xs, ())


def _fake_mt_norm_sq(xs):
    check_lists("mt_norm_sq", [("xs", xs, False)])
    return _reduction_out(xs, ())


def _fake_mt_axpby_(ys, xs, a, b, exact=False):
    op = "mt_axpby_"
    check_lists(op, [("ys", ys, True), ("xs", xs, False)])
    check_scalar(op, "a", a, ys[0].device, read=False)
    check_scalar(op, "b", b, ys[0].device, read=False)


def _cg_lists(names, written, lists, minv):
    specs = [(n, ts, w) for n, ts, w in zip(names, lists, written)]
    return specs + ([("minv", minv, False)] if minv is not None else [])


def _fake_mt_cg_step_(xs, rs, ps, hps, alpha, minv=None, exact=False):
    op = "mt_cg_step_"
    check_lists(op, _cg_lists(("xs", "rs", "ps", "hps"), (True, True, False, False), (xs, rs, ps, hps), minv))
    check_scalar(op, "alpha", alpha, xs[0].device, read=False)
    return _reduction_out(xs, (3,))


def _fake_mt_cg_direction_(ps, rs, beta, minv=None, exact=False):
    op = "mt_cg_direction_"
    check_lists(op, _cg_lists(("ps", "rs"), (True, False), (ps, rs), minv))
    check_scalar(op, "beta", beta, ps[0].device, read=False)


if _extension.loaded():  # _C defines the schemas the fakes attach to
    for _name in ("mt_dot", "mt_norm_sq", "mt_axpby_", "mt_cg_step_", "mt_cg_direction_"):
        torch.library.register_fake("llmopt_ext::" + _name, globals()["_fake_" + _name])
