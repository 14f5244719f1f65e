"""Preconditioned Steihaug-Toint truncated CG on tensor lists (the inner solver of TRCG).

``steihaug_cg`` approximately minimises the quadratic model ``m(s) = g's + s'Hs/2`` inside
the trust region ``||s||_M <= radius`` (``M = diag(1/minv)``; the identity when ``minv`` is
None), given only Hessian-vector products. It is a pure function of its inputs: it touches no
optimizer state, and every vector operation is one of the project's fused multi-tensor ops.

Per iteration: one HVP, three fused launches (``mt_dot`` for ``p'Hp``, ``mt_cg_step_``,
``mt_cg_direction_``) and ONE host sync. The step length is applied speculatively on the
device, ``alpha = rz / p'Hp`` clamped to the boundary root (known on the host beforehand) and 0
on non-positive curvature, so the sync reads ``p'Hp`` and the updated norms together after the
update; a negative-curvature exit costs one extra ``mt_axpby_``.

The trust-region geometry needs no vector op: ``||s||_M^2``, ``s'Mp`` and ``p'Mp`` follow from
``r'z``, ``alpha`` and ``beta`` (Conn, Gould & Toint, *Trust-Region Methods*, 2000, section
7.5.1), and the model change from ``m(s + tau p) - m(s) = -tau r'z + tau^2 p'Hp / 2``. On
negative curvature the step goes to the boundary root that minimises the model (Nocedal &
Wright, Algorithm 7.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..ops import mt_axpby_, mt_cg_direction_, mt_cg_step_, mt_dot, mt_norm_sq

EXITS = ("converged", "boundary", "negative_curvature", "max_iters", "nonfinite", "zero_gradient")


@dataclass
class CGResult:
    """What :func:`steihaug_cg` returns. ``s``: the step (float32 list, shaped like ``r``);
    ``model_change``: ``m(s) - m(0)`` (<= 0 unless ``exit == "nonfinite"``); ``s_m_s``:
    ``||s||_M^2``; ``exit``: one of :data:`EXITS`; ``iters``: CG iterations = HVPs taken."""

    s: list[torch.Tensor]
    model_change: float
    s_m_s: float
    exit: str
    iters: int


def boundary_roots(s_m_p: float, p_m_p: float, s_m_s: float, radius: float) -> tuple[float, float]:
    """Roots ``tau_- <= 0 <= tau_+`` of ``||s + tau p||_M = radius`` from ``s'Mp``, ``p'Mp``,
    ``||s||_M^2`` (s inside the region)."""
    slack = max(radius * radius - s_m_s, 0.0)  # rounding can push s_m_s a hair past radius^2
    disc = math.sqrt(s_m_p * s_m_p + p_m_p * slack)
    # cancellation-free forms of (-b +- sqrt(b^2 + ac)) / a
    if s_m_p >= 0:
        tau_minus = -(s_m_p + disc) / p_m_p
        tau_plus = slack / (s_m_p + disc) if s_m_p + disc > 0 else 0.0
    else:
        tau_plus = (-s_m_p + disc) / p_m_p
        tau_minus = -slack / (-s_m_p + disc) if disc - s_m_p > 0 else 0.0
    return tau_minus, tau_plus


def cg_start(r: Sequence[torch.Tensor], minv: Sequence[torch.Tensor] | None):
    """First direction ``p0 = -M^-1 r`` and, on the device, ``||r||^2`` and ``r'M^-1 r``."""
    p = [torch.zeros_like(t) for t in r]
    mt_cg_direction_(p, r, 0.0, minv)
    rr = mt_norm_sq(r)
    rz = rr if minv is None else -mt_dot(r, p)
    return p, rr, rz


def _to_host(t: torch.Tensor) -> list[float]:
    return t.tolist()


def _negative_curvature(s, p, rz, php, tau_minus, tau_plus) -> float:
    """Move s to the boundary root that minimises the model; returns the model change."""
    q_minus = -tau_minus * rz + 0.5 * tau_minus**2 * php
    q_plus = -tau_plus * rz + 0.5 * tau_plus**2 * php
    tau, q = (tau_minus, q_minus) if q_minus < q_plus else (tau_plus, q_plus)
    mt_axpby_(s, p, tau, 1.0)  # s was left unchanged (alpha = 0 on curvature <= 0)
    return q


def steihaug_cg(hvp: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
                r: list[torch.Tensor], minv: list[torch.Tensor] | None, radius: float,
                max_iters: int, tol: float, *, p: list[torch.Tensor] | None = None,
                rz: float | None = None,
                host: Callable[[torch.Tensor], list[float]] = _to_host) -> CGResult:
    """Steihaug-Toint CG for ``min g's + s'Hs/2`` s.t. ``||s||_M <= radius``.

    hvp: ``v -> H v`` on float32 lists shaped like ``r`` (one call per iteration).
    r: the residual, initially the gradient ``g`` (float32; overwritten: it ends as
        ``g + H s``). minv: ``M^-1`` diagonal (positive, float32) or None.
    tol: stop when ``||r|| <= tol``. max_iters: cap on iterations (= HVPs).
    p, rz: the first direction ``-M^-1 g`` and ``g'M^-1 g`` when the caller has already
        computed them (:func:`cg_start`; TRCG reads ``rz`` in the same host sync as the loss);
        otherwise computed here at the cost of one more host sync.
    host: reads a device tensor to Python floats (the only host syncs; TRCG counts them).
    """
    if p is None or rz is None:
        p, _, rz_dev = cg_start(r, minv)
        (rz,) = host(rz_dev.reshape(1))
    s = [torch.zeros_like(t) for t in r]
    if not math.isfinite(rz):
        return CGResult(s, 0.0, 0.0, "nonfinite", 0)
    if rz <= 0.0:
        return CGResult(s, 0.0, 0.0, "zero_gradient", 0)
    tol_sq = tol**2
    model_change, s_m_s = 0.0, 0.0
    s_m_p, p_m_p = 0.0, rz
    for it in range(max_iters):
        hp = hvp(p)
        tau_minus, tau_plus = boundary_roots(s_m_p, p_m_p, s_m_s, radius)
        php_dev = mt_dot(p, hp)
        # speculative step: the CG length clamped to the boundary, 0 on curvature <= 0
        alpha_dev = torch.where(php_dev > 0, (rz / php_dev).clamp(max=tau_plus),
                                torch.zeros_like(php_dev))
        norms = mt_cg_step_(s, r, p, hp, alpha_dev, minv)
        php, _, rr_new, rz_new = host(torch.cat([php_dev.reshape(1), norms]))
        if not math.isfinite(php):
            return CGResult(s, model_change, s_m_s, "nonfinite", it + 1)
        if php <= 0:
            q = _negative_curvature(s, p, rz, php, tau_minus, tau_plus)
            return CGResult(s, model_change + q, radius * radius, "negative_curvature", it + 1)
        alpha = rz / php
        if alpha >= tau_plus:  # crossed the boundary: stopped on it (clamped alpha)
            q = -tau_plus * rz + 0.5 * tau_plus**2 * php
            return CGResult(s, model_change + q, radius * radius, "boundary", it + 1)
        if not (math.isfinite(rr_new) and math.isfinite(rz_new)):
            return CGResult(s, model_change, s_m_s, "nonfinite", it + 1)
        model_change += -0.5 * alpha * rz
        s_m_s = s_m_s + 2 * alpha * s_m_p + alpha * alpha * p_m_p
        if rr_new <= tol_sq or rz_new <= 0:
            return CGResult(s, model_change, s_m_s, "converged", it + 1)
        if it + 1 == max_iters:
            break
        beta = rz_new / rz
        s_m_p = beta * (s_m_p + alpha * p_m_p)
        p_m_p = rz_new + beta * beta * p_m_p
        rz = rz_new
        mt_cg_direction_(p, r, beta, minv)
    return CGResult(s, model_change, s_m_s, "max_iters", max_iters)
