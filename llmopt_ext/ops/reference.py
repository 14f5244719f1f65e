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

import math
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
# random Stiefel matrices (llmopt_ext/ops/stiefel.py; kernels in csrc/cpu/philox.h)

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


def philox_normal_(out: torch.Tensor, seed: int, offset: int) -> None:
    """Fill contiguous float32 `out` with N(0, 1) variates: flat element i is a pure function of
    (seed, offset, i) — Philox-4x32-10 with counter (i // 4, offset) and key seed, then
    Box-Muller in float64 on lanes (0, 1) and (2, 3), rounded once to float32."""
    if out.dtype != torch.float32:
        raise TypeError(f"philox_normal_: out has dtype {out.dtype}; expected torch.float32")
    if not out.is_contiguous():
        raise ValueError("philox_normal_: out must be contiguous")
    if seed < 0 or offset < 0:
        raise ValueError(f"philox_normal_: seed and offset must be >= 0, got {seed}, {offset}")
    n = out.numel()
    if n == 0:
        return
    blocks = torch.arange((n + 3) // 4, dtype=torch.int64, device=out.device)
    c0, c1 = blocks & _MASK32, blocks >> 32
    c2 = torch.full_like(blocks, offset & _MASK32)
    c3 = torch.full_like(blocks, (offset >> 32) & _MASK32)
    u = philox4x32(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    unif = [(x.to(torch.float64) + 0.5) * 2.0**-32 for x in u]
    z = []
    for a, b in ((unif[0], unif[1]), (unif[2], unif[3])):
        rho = torch.sqrt(-2.0 * torch.log(a))
        theta = (2.0 * math.pi) * b
        z += [rho * torch.cos(theta), rho * torch.sin(theta)]
    out.copy_(torch.stack(z, dim=1).reshape(-1)[:n].to(torch.float32).view(out.shape))


def _check_orthonormalize(x: torch.Tensor) -> None:
    op = "orthonormalize"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: X must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: X must be a 2-D matrix, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: X has dtype {x.dtype}; expected torch.float32, torch.bfloat16 or torch.float16")
    if x.shape[1] < 1:
        raise ValueError(f"{op}: X must have at least one column, got shape {tuple(x.shape)}")
    if x.shape[0] < x.shape[1]:
        raise ValueError(f"{op}: X must be tall (rows >= columns), got shape {tuple(x.shape)}; "
                         "orthonormalize the transpose for a wide matrix")


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
    _check_orthonormalize(x)
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
