"""Pure-PyTorch reference of every llmopt_ext op: the readable specification.

Tests compare every backend against these functions and benchmarks report every
backend against them. They run on any device and favour clarity over speed.

Numerical contract shared by all backends (see csrc/cpu/float_types.h):
  * scalars (a, b, alpha, beta) are rounded to float32 first;
  * elements are computed in float64 (exact for products of two 16/32-bit floats) and each
    stored element is rounded ONCE from that float64 value into the tensor's dtype;
  * reductions accumulate in float64 and return a float32 tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._checks import check_lists, check_scalar

TensorList = Sequence[torch.Tensor]


# ---------------------------------------------------------------------------
# helpers

def round_from_f64(d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float64 tensor once (round-to-nearest-even) into `dtype`.

    float32 is a direct conversion. For bfloat16/float16 a direct conversion through
    float32 would round twice; rounding to float32 *to odd* first (truncate, then set the
    last bit if anything was dropped) keeps enough information for the second rounding
    to equal a single one.
    """
    f = d.to(torch.float32)
    if dtype == torch.float32:
        return f
    inexact = f.to(torch.float64) != d
    toward_zero = f.to(torch.float64).abs() > d.abs()
    bits = f.view(torch.int32) - toward_zero.to(torch.int32)
    bits = torch.where(inexact & ~d.isnan(), bits | 1, bits)
    return bits.view(torch.float32).to(dtype)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def _coef(s: torch.Tensor) -> torch.Tensor:
    """A scalar coefficient: rounded to float32, used in float64."""
    return s.reshape(()).to(torch.float32).to(torch.float64)


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64, device=like.device)


# ---------------------------------------------------------------------------
# multi-tensor vector ops

def mt_dot(xs: TensorList, ys: TensorList) -> torch.Tensor:
    """sum_i <xs[i], ys[i]>"""
    check_lists("mt_dot", [("xs", xs, False), ("ys", ys, False)])
    total = _zero(xs[0])
    for x, y in zip(xs, ys):
        total = total + (_f64(x) * _f64(y)).sum()
    return total.to(torch.float32)


def mt_norm_sq(xs: TensorList) -> torch.Tensor:
    """sum_i ||xs[i]||^2"""
    check_lists("mt_norm_sq", [("xs", xs, False)])
    total = _zero(xs[0])
    for x in xs:
        total = total + _f64(x).square().sum()
    return total.to(torch.float32)


def mt_axpby_(ys: TensorList, xs: TensorList, a: torch.Tensor, b: torch.Tensor) -> None:
    """ys[i] = a * xs[i] + b * ys[i]"""
    check_lists("mt_axpby_", [("ys", ys, True), ("xs", xs, False)])
    check_scalar("mt_axpby_", "a", a, ys[0].device)
    check_scalar("mt_axpby_", "b", b, ys[0].device)
    a64, b64 = _coef(a), _coef(b)
    for y, x in zip(ys, xs):
        y.copy_(round_from_f64(a64 * _f64(x) + b64 * _f64(y), y.dtype))


def mt_cg_step_(
    xs: TensorList,
    rs: TensorList,
    ps: TensorList,
    hps: TensorList,
    alpha: torch.Tensor,
    minv: TensorList | None = None,
) -> torch.Tensor:
    """x += alpha * p; r += alpha * hp; returns [||x||^2, ||r||^2, r^T M^-1 r] of the new x, r
    (M^-1 = diag(minv), the identity when minv is None)."""
    lists = [("xs", xs, True), ("rs", rs, True), ("ps", ps, False), ("hps", hps, False)]
    if minv is not None:
        lists.append(("minv", minv, False))
    check_lists("mt_cg_step_", lists)
    check_scalar("mt_cg_step_", "alpha", alpha, xs[0].device)
    a = _coef(alpha)
    x_sq, r_sq, r_z = _zero(xs[0]), _zero(xs[0]), _zero(xs[0])
    for i, (x, r, p, hp) in enumerate(zip(xs, rs, ps, hps)):
        x_new = round_from_f64(_f64(x) + a * _f64(p), x.dtype)
        r_new = round_from_f64(_f64(r) + a * _f64(hp), r.dtype)
        x.copy_(x_new)
        r.copy_(r_new)
        xv, rv = _f64(x_new), _f64(r_new)
        x_sq = x_sq + xv.square().sum()
        r_sq = r_sq + rv.square().sum()
        z = rv if minv is None else _f64(minv[i]) * rv
        r_z = r_z + (rv * z).sum()
    return torch.stack([x_sq, r_sq, r_z]).to(torch.float32)


def mt_cg_direction_(
    ps: TensorList, rs: TensorList, beta: torch.Tensor, minv: TensorList | None = None
) -> None:
    """p = -(M^-1 r) + beta * p"""
    lists = [("ps", ps, True), ("rs", rs, False)]
    if minv is not None:
        lists.append(("minv", minv, False))
    check_lists("mt_cg_direction_", lists)
    check_scalar("mt_cg_direction_", "beta", beta, ps[0].device)
    b = _coef(beta)
    for i, (p, r) in enumerate(zip(ps, rs)):
        z = _f64(r) if minv is None else _f64(minv[i]) * _f64(r)
        p.copy_(round_from_f64(b * _f64(p) - z, p.dtype))


# ---------------------------------------------------------------------------
# LoRA (llmopt_ext/ops/lora.py)

def _lora_scaling64(scaling) -> torch.Tensor | float:
    if isinstance(scaling, torch.Tensor):
        return scaling.reshape(()).to(torch.float64)
    return float(scaling)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling,
    dropout_p: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """y = x W^T + bias + scaling * (dropout(x) A^T) B^T, in float64, rounded once into x's
    dtype. W is (out, in), or (in, out) with fan_in_fan_out. Differentiable (autograd through
    the float64 math); dropout draws from torch's default generator."""
    from ._lora_checks import check_linear  # noqa: PLC0415

    check_linear("lora_linear", x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    x64 = x.to(torch.float64)
    w64 = weight.to(torch.float64)
    w64 = w64 if fan_in_fan_out else w64.t()  # (in, out)
    y = x64 @ w64
    if bias is not None:
        y = y + bias.to(torch.float64)
    xd = torch.nn.functional.dropout(x64, dropout_p, training) if dropout_p > 0 else x64
    low = (xd @ lora_A.to(torch.float64).t()) @ lora_B.to(torch.float64).t()
    y = y + _lora_scaling64(scaling) * low
    return y.to(x.dtype)


def _lora_delta_f32(weight, lora_A, lora_B, scaling, fan_in_fan_out) -> torch.Tensor:
    """D = float32(s * acc), acc = sum_j P[:, j] Q[j, :] in float32 in j order (no FMA):
    the contract of csrc/cpu/lora.h. P = B, Q = A (or A^T, B^T for fan_in_fan_out)."""
    P = (lora_A.t() if fan_in_fan_out else lora_B).to(torch.float32)
    Q = (lora_B.t() if fan_in_fan_out else lora_A).to(torch.float32)
    acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for j in range(P.shape[1]):
        acc = acc + P[:, j : j + 1] * Q[j : j + 1, :]  # two roundings, like mul then add
    s = scaling.reshape(()).to(torch.float32) if isinstance(scaling, torch.Tensor) else torch.tensor(
        float(scaling), dtype=torch.float32)
    return s.to(weight.device) * acc


def lora_merge_(weight, lora_A, lora_B, scaling, fan_in_fan_out: bool = False) -> None:
    """weight += s * B A (or its transpose for fan_in_fan_out), accumulated in float32 and
    rounded once into weight's dtype."""
    from ._lora_checks import check_merge  # noqa: PLC0415

    check_merge("lora_merge_", weight, lora_A, lora_B, scaling, fan_in_fan_out)
    d = _lora_delta_f32(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    weight.copy_(round_from_f64(_f64(weight) + _f64(d), weight.dtype))


def lora_unmerge_(weight, lora_A, lora_B, scaling, fan_in_fan_out: bool = False) -> None:
    """weight -= s * B A with the same float32 delta as lora_merge_, rounded once."""
    from ._lora_checks import check_merge  # noqa: PLC0415

    check_merge("lora_unmerge_", weight, lora_A, lora_B, scaling, fan_in_fan_out)
    d = _lora_delta_f32(weight, lora_A, lora_B, scaling, fan_in_fan_out)
    weight.copy_(round_from_f64(_f64(weight) - _f64(d), weight.dtype))
