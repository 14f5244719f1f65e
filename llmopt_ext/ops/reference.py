"""Pure-PyTorch reference of every llmopt_ext op: the readable specification.

Tests compare every backend against these functions and benchmarks report every
backend against them. They run on any device and favour clarity over speed.

Numerical contract shared by all backends (see csrc/common/float_types.h):
  * scalars (a, b, alpha, beta) are rounded to float32 first;
  * elements are computed in float64 (exact for products of two 16/32-bit floats) and each
    stored element is rounded ONCE from that float64 value into the tensor's dtype;
  * reductions accumulate in float64 and return a float32 tensor.
Exception, the default of the element-wise multi-tensor ops (``exact=False``) on bfloat16 /
float16 storage: float32 math, each product and sum rounded to float32 separately in the
written order (one torch float32 op at a time), then one round-to-nearest-even into the
16-bit dtype (``.to(dtype)``); see csrc/common/multi_tensor_math.h.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ._checks import (check_adahessian_hyper, check_lists, check_no_alias, check_optim_args,
                      check_orthonormalize, check_philox_normal, check_scalar, check_sophia_hyper,
                      check_step_value)

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


def _fast16(t: torch.Tensor, exact: bool) -> bool:
    """The float32 path: 16-bit storage and exact=False (float32 storage is always exact)."""
    return not exact and t.dtype in (torch.bfloat16, torch.float16)


def _load_f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def _coef32(s: torch.Tensor) -> torch.Tensor:
    """A scalar coefficient rounded to float32 (a 0-dim float32 tensor)."""
    return s.reshape(()).to(torch.float32)


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


def mt_axpby_(ys: TensorList, xs: TensorList, a: torch.Tensor, b: torch.Tensor, exact: bool = False) -> None:
    """ys[i] = a * xs[i] + b * ys[i]; 16-bit storage with exact=False:
    y = R16(fl(fl(a*x) + fl(b*y)))"""
    lists = [("ys", ys, True), ("xs", xs, False, "ys")]  # xs may be ys
    check_lists("mt_axpby_", lists)
    check_no_alias("mt_axpby_", lists)
    check_scalar("mt_axpby_", "a", a, ys[0].device)
    check_scalar("mt_axpby_", "b", b, ys[0].device)
    if _fast16(ys[0], exact):
        a32, b32 = _coef32(a), _coef32(b)
        for y, x in zip(ys, xs):
            ax = a32 * _load_f32(x)  # each float32 op rounds once; no FMA
            by = b32 * _load_f32(y)
            y.copy_((ax + by).to(y.dtype))
        return
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
    exact: bool = False,
) -> torch.Tensor:
    """x += alpha * p; r += alpha * hp; returns [||x||^2, ||r||^2, r^T M^-1 r] of the new x, r
    (M^-1 = diag(minv), the identity when minv is None). 16-bit storage with exact=False:
    x = R16(fl(x + fl(alpha*p))), r = R16(fl(r + fl(alpha*hp))); the norms are float64 sums
    of the stored values either way."""
    lists = [("xs", xs, True), ("rs", rs, True), ("ps", ps, False), ("hps", hps, False)]
    if minv is not None:
        lists.append(("minv", minv, False))
    check_lists("mt_cg_step_", lists)
    check_no_alias("mt_cg_step_", lists)
    check_scalar("mt_cg_step_", "alpha", alpha, xs[0].device)
    fast = _fast16(xs[0], exact)
    a = _coef(alpha)
    a32 = _coef32(alpha)
    x_sq, r_sq, r_z = _zero(xs[0]), _zero(xs[0]), _zero(xs[0])
    for i, (x, r, p, hp) in enumerate(zip(xs, rs, ps, hps)):
        if fast:
            x_new = (_load_f32(x) + a32 * _load_f32(p)).to(x.dtype)
            r_new = (_load_f32(r) + a32 * _load_f32(hp)).to(r.dtype)
        else:
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
    ps: TensorList, rs: TensorList, beta: torch.Tensor, minv: TensorList | None = None,
    exact: bool = False,
) -> None:
    """p = -(M^-1 r) + beta * p; 16-bit storage with exact=False:
    z = minv ? fl(minv*r) : r, p = R16(fl(fl(beta*p) - z))"""
    lists = [("ps", ps, True), ("rs", rs, False)]
    if minv is not None:
        lists.append(("minv", minv, False))
    check_lists("mt_cg_direction_", lists)
    check_no_alias("mt_cg_direction_", lists)
    check_scalar("mt_cg_direction_", "beta", beta, ps[0].device)
    if _fast16(ps[0], exact):
        b32 = _coef32(beta)
        for i, (p, r) in enumerate(zip(ps, rs)):
            z = _load_f32(r) if minv is None else _load_f32(minv[i]) * _load_f32(r)
            p.copy_((b32 * _load_f32(p) - z).to(p.dtype))
        return
    b = _coef(beta)
    for i, (p, r) in enumerate(zip(ps, rs)):
        z = _f64(r) if minv is None else _f64(minv[i]) * _f64(r)
        p.copy_(round_from_f64(b * _f64(p) - z, p.dtype))


# ---------------------------------------------------------------------------
# fused optimizer updates (llmopt_ext/ops/optim_update.py)
#
# Numerical contract (csrc/common/optim_update_math.h): float32 math, one rounding per
# operation in the order written here, hyperparameters rounded to float32 (derived ones,
# such as 1 - lr * weight_decay, computed in float64 first), each parameter rounded once
# into its dtype on store. Division by a scalar is an element-wise division (torch would
# otherwise multiply by a rounded reciprocal).

def _f32c(x: float) -> float:
    """x rounded to float32 (as a Python float)."""
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


def _div_scalar(t: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    return t / torch.full_like(t, float(s))


def _amp(op: str, grad_scale, found_inf, device) -> tuple[bool, float]:
    """(skip, scale): the reference reads the device scalars on the host (it may sync)."""
    scale = 1.0
    if grad_scale is not None:
        check_scalar(op, "grad_scale", grad_scale, device)
        scale = _f32c(float(grad_scale.reshape(()).to(torch.float32)))
    if found_inf is not None:
        check_scalar(op, "found_inf", found_inf, device)
        if float(found_inf.reshape(())) != 0.0:
            return True, scale
    return False, scale


def sophia_update_(
    params: TensorList,
    grads: TensorList,
    exp_avgs: TensorList,
    hessians: TensorList,
    lr: float,
    beta1: float,
    rho: float,
    weight_decay: float,
    eps: float,
    clip: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One Sophia step, in place on params and exp_avgs (m), given the Hessian EMA h:

        m <- beta1 m + (1 - beta1) g;  p <- p (1 - lr wd)
        SophiaG (clip=False): p <- p - lr sign(m) min(|m| / (rho h + eps), 1)
        SophiaH (clip=True):  p <- p - lr clamp(m / max(h, eps), -rho, rho)

    (For SophiaG pass rho = rho * bs.) g = grad / grad_scale; nothing happens when
    found_inf != 0."""
    op = "sophia_update_"
    param_lists = [("params", params, True), ("grads", grads, False)]
    state_lists = [("exp_avgs", exp_avgs, True), ("hessians", hessians, False)]
    check_optim_args(op, param_lists, state_lists)
    check_no_alias(op, param_lists + state_lists)
    check_sophia_hyper(lr, beta1, rho, weight_decay, eps)
    skip, scale = _amp(op, grad_scale, found_inf, params[0].device)
    if skip:
        return
    lr_f, b1, omb1 = _f32c(lr), _f32c(beta1), _f32c(1.0 - beta1)
    rho_f, eps_f, decay = _f32c(rho), _f32c(eps), _f32c(1.0 - lr * weight_decay)
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        gf = _div_scalar(g.to(torch.float32), scale)
        m_new = m * b1 + gf * omb1
        pf = p.to(torch.float32) * decay
        if clip:
            u = (m_new / h.clamp(min=eps_f)).clamp(max=rho_f).clamp(min=-rho_f)
        else:
            ratio = (m_new.abs() / (h * rho_f + eps_f)).clamp(max=1.0)
            u = torch.copysign(ratio, m_new)
        pf = pf - u * lr_f
        m.copy_(m_new)
        p.copy_(pf.to(p.dtype))


def adahessian_update_(
    params: TensorList,
    grads: TensorList,
    exp_avgs: TensorList,
    exp_hessian_diag_sqs: TensorList,
    hessians: TensorList,
    step: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    hessian_power: float,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdaHessian step (step = the step number t >= 1, after incrementing):

        m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) d^2
        p <- p (1 - lr wd) - lr / (1 - beta1^t) * m / ((v / (1 - beta2^t))^(k/2) + eps)

    with d the Hessian-diagonal estimate (hessians). g and d are divided by grad_scale;
    nothing happens when found_inf != 0."""
    op = "adahessian_update_"
    param_lists = [("params", params, True), ("grads", grads, False)]
    state_lists = [("exp_avgs", exp_avgs, True), ("exp_hessian_diag_sqs", exp_hessian_diag_sqs, True),
                   ("hessians", hessians, False)]
    check_optim_args(op, param_lists, state_lists)
    check_no_alias(op, param_lists + state_lists)
    check_adahessian_hyper(lr, beta1, beta2, weight_decay, eps, hessian_power)
    check_scalar(op, "step", step, params[0].device)
    t = float(step.reshape(()).to(torch.float32))
    check_step_value(op, t)
    skip, scale = _amp(op, grad_scale, found_inf, params[0].device)
    if skip:
        return
    b1, omb1, b2, omb2 = _f32c(beta1), _f32c(1.0 - beta1), _f32c(beta2), _f32c(1.0 - beta2)
    bc2 = _f32c(1.0 - beta2**t)
    step_size = _f32c(lr / (1.0 - beta1**t))
    decay, eps_f, half = _f32c(1.0 - lr * weight_decay), _f32c(eps), _f32c(hessian_power / 2.0)
    for p, g, m, v, d in zip(params, grads, exp_avgs, exp_hessian_diag_sqs, hessians):
        gf = _div_scalar(g.to(torch.float32), scale)
        df = _div_scalar(d, scale)
        m_new = m * b1 + gf * omb1
        v_new = v * b2 + (df * df) * omb2
        q = _div_scalar(v_new, bc2)
        # torch's CPU sqrt is not correctly rounded (658 of 1e5 floats differ by an ulp, torch
        # 2.13); the float64 root rounded to float32 is, as are sqrtf in C and CUDA.
        root = q.double().sqrt() if hessian_power == 1.0 else q.double().pow(half)
        den = root.float() + eps_f
        pf = p.to(torch.float32) * decay - (m_new / den) * step_size
        m.copy_(m_new)
        v.copy_(v_new)
        p.copy_(pf.to(p.dtype))


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


# ---------------------------------------------------------------------------
# random Stiefel matrices (llmopt_ext/ops/stiefel.py; kernels in csrc/common/philox.h)

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 round multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK32 = 0xFFFFFFFF
# diag(R) spread above which CholeskyQR2 (in float64) hands over to Householder QR
# (see csrc/cpu/stiefel.h: at cond 1e6 the first pass still leaves ~1e-4 for the second)
ORTHO_MAX_DIAG_RATIO = 1e6


def _mulhilo32(a: torch.Tensor, mult: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * mult for int64 tensors holding uint32 values.
    Split into 16-bit halves so no product leaves int64 (each half-product < 2^48)."""
    p_lo = (a & 0xFFFF) * mult
    p_hi = (a >> 16) * mult
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4x32-10 (Salmon et al. 2011) on int64 tensors of uint32 counters."""
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _f32(x: float) -> torch.Tensor:
    """A float64 constant rounded to nearest float32 (as the C++ kernels' static_casts)."""
    return torch.tensor(x, dtype=torch.float64).to(torch.float32)


# The float32 Box-Muller constants of csrc/common/philox.h, rounded the same way.
_BM = {
    "two_m24": _f32(2.0**-24), "ln2_hi": _f32(0.693145751953125),
    "ln2_lo": _f32(1.4286068203094172321214581765680755e-06),
    "half_pi": _f32(math.pi / 2), "sqrt_half": _f32(math.sqrt(0.5)),
    "l": [_f32(2.0 / k) for k in (3, 5, 7, 9, 11)],
    "s": [_f32((-1.0) ** (k // 2) / math.factorial(k)) for k in (3, 5, 7, 9, 11, 13)],
    "c": [_f32((-1.0) ** (k // 2) / math.factorial(k)) for k in (2, 4, 6, 8, 10, 12)],
}
_SQRT_HALF_BITS = 0x3F3504F3


def _horner(x2: torch.Tensor, coeffs) -> torch.Tensor:
    """c0 + x2 (c1 + x2 (c2 + ...)), each + and * rounded separately (no FMA)."""
    p = coeffs[-1].to(x2.device) * x2
    for c in reversed(coeffs[1:-1]):
        p = (p + c.to(x2.device)) * x2
    return p + coeffs[0].to(x2.device)


def box_muller_f32(a: torch.Tensor, b: torch.Tensor):
    """Box-Muller on Philox words a, b (int64 tensors of uint32) in float32, the op sequence of
    csrc/common/philox.h: u = (2 (a >> 9) + 1) 2^-24, rho = sqrt(-2 ln u) with ln by exponent
    split and the atanh series; theta = (b >> 30) pi/2 + pi/4 + x, sin x / cos x by Taylor
    series. Every step one IEEE float32 operation, so the result is the kernels' to the bit."""
    dev = a.device
    k = {n: v.to(dev) for n, v in _BM.items() if not isinstance(v, list)}
    u = (2 * (a >> 9) + 1).to(torch.float32) * k["two_m24"]
    bits = u.view(torch.int32)
    e = (bits - _SQRT_HALF_BITS) >> 23
    m = (bits - e * (1 << 23)).view(torch.float32)
    f = m - 1.0
    s = f / (f + 2.0)
    s2 = s * s
    ln_m = (s + s) + s * (s2 * _horner(s2, _BM["l"]))
    ef = e.to(torch.float32)
    ln_u = ef * k["ln2_hi"] + (ln_m + ef * k["ln2_lo"])
    # torch's float32 sqrt is not always correctly rounded on CPU (vectorised, within 1 ulp);
    # the float64 one rounded to float32 is (53 >= 2 * 24 + 2 bits: no double-rounding error).
    rho = torch.sqrt((ln_u * -2.0).double()).to(torch.float32)
    q = b >> 30
    t = (2 * ((b >> 7) & 0x7FFFFF) + 1).to(torch.float32) * k["two_m24"]
    x = (t - 0.5) * k["half_pi"]
    x2 = x * x
    sn = x + x * (x2 * _horner(x2, _BM["s"]))
    cs = x2 * _horner(x2, _BM["c"]) + 1.0
    c1 = (cs - sn) * k["sqrt_half"]
    s1 = (cs + sn) * k["sqrt_half"]
    odd = (q & 1) == 1
    cq, sq = torch.where(odd, s1, c1), torch.where(odd, c1, s1)
    cos_t = torch.where((q == 1) | (q == 2), -cq, cq)
    sin_t = torch.where(q >= 2, -sq, sq)
    return rho * cos_t, rho * sin_t


def philox_normal_(out: torch.Tensor, seed: int, offset: int) -> None:
    """Fill contiguous float32 `out` with N(0, 1) variates: flat element i is a pure function of
    (seed, offset, i) — Philox-4x32-10 with counter (i // 4, offset) and key seed, then
    Box-Muller in float32 (:func:`box_muller_f32`) on lanes (0, 1) and (2, 3)."""
    check_philox_normal(out, seed, offset)
    n = out.numel()
    if n == 0:
        return
    blocks = torch.arange((n + 3) // 4, dtype=torch.int64, device=out.device)
    c0, c1 = blocks & _MASK32, blocks >> 32
    c2 = torch.full_like(blocks, offset & _MASK32)
    c3 = torch.full_like(blocks, (offset >> 32) & _MASK32)
    u = philox4x32(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    z = [*box_muller_f32(u[0], u[1]), *box_muller_f32(u[2], u[3])]
    out.copy_(torch.stack(z, dim=1).reshape(-1)[:n].view(out.shape))


def householder_orthonormalize(x: torch.Tensor) -> torch.Tensor:
    """Q of the Householder QR of x (float64) with signs chosen so that diag(R) >= 0."""
    q, r = torch.linalg.qr(x.to(torch.float64), mode="reduced")
    sign = torch.where(r.diagonal() < 0, -1.0, 1.0).to(q)
    return (q * sign).to(x.dtype)


def orthonormalize(x: torch.Tensor) -> torch.Tensor:
    """The Q factor of the thin QR decomposition X = QR with diag(R) > 0 (unique for full-rank X),
    by CholeskyQR2 in float64: twice {G = W^T W = L L^T; W = W L^-T}. When the Cholesky factor
    breaks down or diag(L) spans more than ORTHO_MAX_DIAG_RATIO, Householder QR (sign-fixed)
    instead. NaN/Inf in X raise ValueError. Result in X's dtype, contiguous."""
    check_orthonormalize(x)
    w = x.to(torch.float64)
    for pass_ in range(2):
        g = w.mT @ w
        if pass_ == 0 and not bool(torch.isfinite(g.diagonal()).all()):
            raise ValueError("orthonormalize: X contains NaN or Inf")
        lower, info = torch.linalg.cholesky_ex(g)
        d = lower.diagonal()
        if int(info) != 0 or float(d.max()) > ORTHO_MAX_DIAG_RATIO * float(d.min()):
            return householder_orthonormalize(x).contiguous()
        w = torch.linalg.solve_triangular(lower.mT, w, upper=True, left=False)
    return w.to(x.dtype).contiguous()
