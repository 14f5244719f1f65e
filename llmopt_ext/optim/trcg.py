"""TRCG: Hessian-free trust-region Newton-CG (preconditioned Steihaug-Toint CG).

Each ``step(closure)``:

1. ``loss = closure()`` with grad enabled; the gradient ``g`` is taken with ``create_graph``
   so Hessian-vector products are backward passes through it (or forward-over-reverse).
2. Preconditioned Steihaug-Toint CG (:func:`llmopt_ext.optim.steihaug.steihaug_cg`) on the
   model ``m(s) = g's + s'Hs/2`` inside the trust region ``||s||_M <= radius``
   (``M = diag(1/minv)``, the identity without preconditioner).
   Per CG iteration: one HVP, three fused multi-tensor launches (``mt_dot`` for ``p'Hp``,
   ``mt_cg_step_``, ``mt_cg_direction_``) and ONE host sync. The step length is applied
   speculatively on the device, ``alpha = rz / p'Hp`` clamped to the boundary root (known on
   the host beforehand, see below) and 0 on non-positive curvature, so the sync reads
   ``p'Hp`` and the updated norms together after the update: converged solves waste no HVP and
   a boundary exit costs one extra ``mt_axpby_`` launch only for negative curvature.
3. The trust-region geometry needs no vector op: ``||s||_M^2``, ``s'Mp`` and ``p'Mp`` follow
   from ``r'z``, ``alpha`` and ``beta`` (Conn, Gould & Toint, *Trust-Region Methods*, 2000,
   section 7.5.1), so the boundary roots of ``||s + tau p||_M = radius`` are on the host
   before the HVP returns. The model decrease comes from the same recurrences,
   ``m(s + tau p) - m(s) = -tau r'z + tau^2 p'Hp / 2``: no extra HVP for ``d'Hd``.
4. On negative curvature the step goes to the boundary root (of the two) that minimises the
   model (Nocedal & Wright, Algorithm 7.2); on crossing with positive curvature that is
   always the positive root.
5. The trial point is evaluated on the SAME mini-batch under no_grad, ``rho = actual /
   predicted``, the step is accepted if ``rho > eta``, and the radius is updated.

The shrinking radius on stochastic mini-batches (llm-opt multiplies the radius by 2 before
every step to fight it). A radius update is a random walk in ``log(radius)``: with the
textbook factors (x0.25 on failure, x2 on success) it drifts towards zero unless more than
``log 4 / (log 4 + log 2) = 2/3`` of the steps succeed, and on mini-batches the quadratic
model of one batch is sometimes wrong at any radius. TRCG answers with three rules:

* log-symmetric factors (``shrink=0.5``, ``expand=2``): the walk drifts UP whenever more than
  half of the steps succeed, the condition under which stochastic trust-region methods keep
  their radius bounded away from zero (STORM: Chen, Menickelly & Scheinberg, Math. Prog. 2018;
  Blanchet, Cartis, Menickelly & Scheinberg, INFORMS J. Optim. 2019);
* the boundary test uses the CG exit reason (boundary / negative curvature), never a float
  equality of ``||s||`` and the radius, which in float32 fails and stops expansion;
* ``rho`` compares actual and predicted reduction on the same batch, and both get a
  rounding allowance ``10 * eps * max(1, |f|)`` (Conn-Gould-Toint section 17.4.2): near a
  (batch) minimiser both are rounding noise, ``rho`` tends to 1 instead of a random sign,
  and accurate steps are not rejected for noise.
A failed interior step shrinks from the step length (``shrink * min(radius, ||s||_M)``), so
the radius binds after one failure. tests/test_trcg.py checks the walk on a synthetic
success sequence and the radius on stochastic logistic regression.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from ._common import GuardedOptimizer, check_beta, check_nonneg
from .hvp import DoubleBackwardHVP, ForwardOverReverseHVP, math_sdpa
from .steihaug import CGResult, boundary_roots, cg_start, steihaug_cg  # noqa: F401 (boundary_roots: public here too)

HVP_METHODS = ("double_backward", "forward_over_reverse")
PRECONDITIONERS = (None, "abs_grad_ema")

# counters kept across steps (state_dict "trcg" entry)
_GLOBAL_KEYS = ("radius", "steps", "accepted_steps", "hvps", "syncs", "precond_steps", "skipped_steps")


def default_cg_tol(r0_norm: float) -> float:
    """Stop CG when ``||r|| <= min(0.5, sqrt(||r0||)) * ||r0||`` (superlinear local rate,
    Nocedal & Wright eq. 7.3 with forcing sequence min(0.5, sqrt(||g||)))."""
    return min(0.5, math.sqrt(r0_norm)) * r0_norm


def update_radius(radius: float, rho: float, exit_reason: str, step_norm: float, *,
                  shrink: float, expand: float, shrink_below: float, expand_above: float,
                  min_radius: float, max_radius: float) -> float:
    """The radius after a step with ratio ``rho`` (NaN: non-finite step)."""
    if not math.isfinite(rho) or rho < shrink_below:
        base = radius if not math.isfinite(step_norm) or step_norm <= 0 else min(radius, step_norm)
        return max(shrink * base, min_radius)
    if rho > expand_above and exit_reason in ("boundary", "negative_curvature"):
        return min(expand * radius, max_radius)
    return radius


class TRCG(GuardedOptimizer):
    """Trust-region Newton-CG with Hessian-vector products (no learning rate).

    Args:
        params: parameters (one trust region over all of them; a group whose settings differ
            from the first group's is refused).
        radius: initial trust radius, in the M-norm (default 1.0). With ``abs_grad_ema`` the
            preconditioner is normalised to mean 1, so the radius stays in parameter units.
        max_radius / min_radius: bounds of the radius (default 100 / 1e-12).
        eta: accept the step if ``rho > eta`` (default 0.01).
        shrink, expand: radius factors (default 0.5 and 2: log-symmetric, see module doc).
        shrink_below, expand_above: ``rho`` thresholds for shrinking / expanding (0.25 / 0.75;
            expansion also needs a boundary or negative-curvature exit).
        max_cg_iters: CG iteration cap = HVPs per step (default 20).
        cg_tol: callable ``||r0|| -> tolerance`` on ``||r||`` (default :func:`default_cg_tol`).
        preconditioner: None or ``"abs_grad_ema"``: ``M = diag(v + eps * mean(v)) / mean(v)``
            with ``v`` the bias-corrected EMA of ``|g|`` (as in llm-opt) -- cheap, and it makes
            CG scale-invariant per coordinate.
        precond_beta, precond_eps: EMA factor (0.9) and relative floor (1e-3) of that preconditioner.
        hvp: ``"double_backward"`` (default; fastest measured on CPU) or
            ``"forward_over_reverse"`` (torch.func; needs ``model``, deterministic closure).
        model: the module owning the parameters (only for forward-over-reverse).
        sdpa_math: run the differentiated passes with SDPA's math backend (default True; the
            fused attention kernels have no double backward).
        process_group: ``"auto"`` (the default group when torch.distributed is initialised
            with more than one rank), None (never) or a group. Losses, gradients and HVPs are
            averaged over it, so all ranks take the same decisions and keep identical params.

    ``step(closure)``: ``closure()`` evaluates the loss of the current mini-batch with grad
    enabled and does NOT call backward; it is called again under no_grad at the trial point,
    so it must be deterministic (same batch, no dropout). Returns the loss at the start of
    the step. ``last_stats`` holds the step's statistics (CG iterations, exit reason, rho,
    radius, HVPs, host syncs, ...).

    A NaN/Inf loss, gradient or Hessian-vector product skips the step: parameters, the
    preconditioner EMA, the radius and the step counters stay as they were, and
    ``skipped_steps`` counts it (a non-finite loss at the TRIAL point is an ordinary rejected
    step: the radius shrinks). Param groups must share the first group's settings.
    """

    _name = "TRCG"

    # driving contract (llmopt_ext.optim.driver): no learning rate; the closure returns the loss
    step_kind = "closure_loss"
    lr_free = True
    uses_hvp = True
    supports_grad_scaler = False

    def __init__(self, params: Iterable, radius: float = 1.0, max_radius: float = 100.0,
                 min_radius: float = 1e-12, eta: float = 0.01, shrink: float = 0.5,
                 expand: float = 2.0, shrink_below: float = 0.25, expand_above: float = 0.75,
                 max_cg_iters: int = 20, cg_tol: Callable[[float], float] | None = None,
                 preconditioner: str | None = None, precond_beta: float = 0.9,
                 precond_eps: float = 1e-3, hvp: str = "double_backward",
                 model: torch.nn.Module | None = None, sdpa_math: bool = True,
                 process_group="auto"):
        if not 0 < min_radius <= radius <= max_radius:
            raise ValueError(f"need 0 < min_radius <= radius <= max_radius, got {min_radius}, {radius}, {max_radius}")
        if not 0 <= eta < shrink_below <= expand_above < 1:
            raise ValueError("need 0 <= eta < shrink_below <= expand_above < 1")
        if not 0 < shrink < 1 < expand:
            raise ValueError(f"need 0 < shrink < 1 < expand, got {shrink}, {expand}")
        if max_cg_iters < 1:
            raise ValueError(f"max_cg_iters must be >= 1, got {max_cg_iters}")
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
        if hvp not in HVP_METHODS:
            raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
        if hvp == "forward_over_reverse" and model is None:
            raise ValueError("hvp='forward_over_reverse' needs the module: TRCG(..., model=model)")
        defaults = dict(radius=radius, max_radius=max_radius, min_radius=min_radius, eta=eta,
                        shrink=shrink, expand=expand, shrink_below=shrink_below,
                        expand_above=expand_above, max_cg_iters=max_cg_iters,
                        preconditioner=preconditioner, precond_beta=precond_beta,
                        precond_eps=precond_eps, hvp=hvp)
        super().__init__(params, defaults)
        for p in self._params():
            if not p.is_floating_point():
                raise TypeError("TRCG: parameters must be floating point")
        self.cg_tol = cg_tol or default_cg_tol
        self.model = model
        self.sdpa_math = sdpa_math
        self._process_group = process_group
        self.trcg_state: dict = dict(radius=float(radius), steps=0, accepted_steps=0, hvps=0,
                                     syncs=0, precond_steps=0, skipped_steps=0)
        self.last_stats: dict = {}

    def _check_group(self, group: dict) -> None:
        check_beta("precond_beta", group["precond_beta"])
        check_nonneg("precond_eps", group["precond_eps"])
        if self.param_groups:  # one trust region: the settings are global
            first = self.param_groups[0]
            for k, v in group.items():
                if k != "params" and first.get(k) != v:
                    raise ValueError(f"TRCG: param group setting {k}={v!r} differs from the first "
                                     f"group's {first.get(k)!r}; TRCG has one trust region, so every "
                                     "group must share the first group's settings")

    @property
    def skipped_steps(self) -> int:
        return self.trcg_state.get("skipped_steps", 0)

    # ---- plumbing ---------------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _group(self):
        pg = self._process_group
        if pg is None:
            return None
        import torch.distributed as dist  # noqa: PLC0415

        if pg == "auto":
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return None
            return dist.group.WORLD
        return pg

    def _mean_over_ranks(self, ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average a list over the process group in one all_reduce (flat buffer, views back)."""
        group = self._group()
        if group is None:
            return ts
        import torch.distributed as dist  # noqa: PLC0415

        with torch.no_grad():
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.all_reduce(flat, group=group)
            flat.div_(dist.get_world_size(group))
        out, offset = [], 0
        for t in ts:  # narrow views (not split's multi-output views: those refuse in-place writes)
            out.append(flat.narrow(0, offset, t.numel()).view_as(t))
            offset += t.numel()
        return out

    def _host(self, t: torch.Tensor) -> list[float]:
        """The one way scalars reach the host (counted: one device sync per call)."""
        self._syncs += 1
        return t.tolist()

    def _preconditioner(self, params, grads) -> tuple[list[torch.Tensor] | None, list | None]:
        """``(M^-1, the updated EMA)``; the EMA is stored by :meth:`_commit` only if the step
        is not skipped (a NaN gradient must not enter it: every later step would be NaN)."""
        group = self.param_groups[0]
        if group["preconditioner"] is None:
            return None, None
        beta, eps = group["precond_beta"], group["precond_eps"]
        old = [self.state[p].get("precond_ema") for p in params]
        emas = torch._foreach_mul([torch.zeros_like(g) if e is None else e for e, g in zip(old, grads)], beta)
        torch._foreach_add_(emas, torch._foreach_abs(grads), alpha=1 - beta)
        # bias correction cancels in the normalisation v / mean(v); mean over all elements on
        # the device (no sync): sum of per-tensor L1 norms of the non-negative EMAs
        numel = sum(e.numel() for e in emas)
        mean = torch.stack(torch._foreach_norm(emas, 1)).sum() / numel
        floor = eps * mean + torch.finfo(torch.float32).tiny
        minv = torch._foreach_add(emas, floor)          # v + eps * mean(v)
        torch._foreach_reciprocal_(minv)
        torch._foreach_mul_(minv, mean + floor)         # mean-1 M; exactly identity when v is constant
        return minv, emas

    # ---- the step -------------------------------------------------------------------------

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        if closure is None:
            raise ValueError("TRCG.step needs a closure that returns the loss (without calling backward)")
        params = self._params()
        if not params:
            raise ValueError("TRCG: no parameter requires grad")
        self._syncs = 0
        radius = self.trcg_state["radius"]
        stats = dict(radius_used=radius, cg_iters=0, hvps=0, exit="", rho=float("nan"),
                     pred=float("nan"), actual=float("nan"), step_norm=0.0, accepted=False,
                     loss=float("nan"), loss_new=float("nan"), skipped=False)
        loss, hvp = self._loss_and_hvp(closure, params)
        f0, cg, r = self._solve(hvp, loss, params, radius)
        hvp.release()
        del hvp
        stats.update(loss=f0, exit=cg.exit, cg_iters=cg.iters, hvps=cg.iters,
                     step_norm=math.sqrt(max(cg.s_m_s, 0.0)))
        if cg.exit == "nonfinite":  # loss, gradient or HVP: skip, nothing changes
            self.trcg_state["skipped_steps"] += 1
            self.trcg_state["syncs"] += self._syncs
            self.trcg_state["hvps"] += cg.iters
            self.last_stats = {**stats, "skipped": True, "radius": radius, "syncs": self._syncs}
            self._new_ema = None
            return loss.detach()
        self._commit_preconditioner(params)
        if cg.exit == "zero_gradient":
            rho = 0.0
        else:
            rho = self._try_step(closure, params, cg, f0, stats, backup=r)
        self._finish(stats, rho, radius)
        return loss.detach()

    def _commit_preconditioner(self, params) -> None:
        if self._new_ema is not None:
            for p, e in zip(params, self._new_ema):
                self.state[p]["precond_ema"] = e
            self.trcg_state["precond_steps"] += 1
        self._new_ema = None

    def _loss_and_hvp(self, closure, params):
        """The closure's loss with its graph, and the HVP operator at the current point."""
        with torch.enable_grad(), math_sdpa(self.sdpa_math):
            loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("TRCG: the closure must return the loss as a one-element tensor")
            if not loss.requires_grad:
                raise RuntimeError("TRCG: the loss does not require grad; the closure must run with "
                                   "grad enabled and must not detach the loss")
            if self.param_groups[0]["hvp"] == "forward_over_reverse":
                hvp = ForwardOverReverseHVP(loss, params, self.model, closure)
            else:
                hvp = DoubleBackwardHVP(loss, params)
        return loss, hvp

    def _solve(self, hvp, loss, params, radius) -> tuple[float, CGResult, list[torch.Tensor]]:
        """Gradient, preconditioner and the Steihaug-CG step; returns (f0, CG result, the
        final residual: dead after CG, reused as the parameter backup)."""
        group = self.param_groups[0]
        # CG vectors are float32 whatever the parameter dtype (bf16 CG diverges)
        r = self._mean_over_ranks([g.detach().to(torch.float32, copy=True) for g in hvp.grads])
        loss_d = self._mean_over_ranks([loss.detach().reshape(1).to(torch.float32)])[0]
        minv, self._new_ema = self._preconditioner(params, r)
        p, rr_dev, rz_dev = cg_start(r, minv)
        f0, rr, rz = self._host(torch.cat([loss_d, rr_dev.reshape(1), rz_dev.reshape(1)]))
        if not all(map(math.isfinite, (f0, rr, rz))):
            return f0, CGResult([torch.zeros_like(t) for t in r], 0.0, 0.0, "nonfinite", 0), r
        if rr == 0.0:
            return f0, CGResult([torch.zeros_like(t) for t in r], 0.0, 0.0, "zero_gradient", 0), r

        def hvp_f32(v):
            with math_sdpa(self.sdpa_math):  # forward-over-reverse re-runs the closure
                hv = hvp(v)
            return self._mean_over_ranks([h if h.dtype == torch.float32 else h.float() for h in hv])

        tol = self.cg_tol(math.sqrt(rr)) if rz > 0 else 0.0
        cg = steihaug_cg(hvp_f32, r, minv, radius, group["max_cg_iters"], tol, p=p, rz=rz,
                         host=self._host)
        return f0, cg, r

    def _try_step(self, closure, params, cg: CGResult, f0: float, stats: dict, *,
                  backup: list[torch.Tensor]) -> float:
        """Apply the step, evaluate the trial point, undo it unless accepted (from ``backup``,
        float32 buffers shaped like the params: a bitwise-exact undo); returns rho."""
        with torch.no_grad():
            torch._foreach_copy_(backup, params)
            torch._foreach_add_(params, cg.s if all(q.dtype == torch.float32 for q in params)
                                else [x.to(q.dtype) for x, q in zip(cg.s, params)])
            new = closure()
        new_d = self._mean_over_ranks([new.detach().reshape(1).to(torch.float32)])[0]
        (f_new,) = self._host(new_d)
        pred = -cg.model_change
        actual = f0 - f_new
        slack = 10 * torch.finfo(torch.float32).eps * max(1.0, abs(f0))
        if not math.isfinite(f_new):
            rho = float("nan")
        elif pred + slack > 0:
            rho = (actual + slack) / (pred + slack)
        else:
            rho = -1.0
        stats.update(loss_new=f_new, pred=pred, actual=actual)
        if math.isfinite(rho) and rho > self.param_groups[0]["eta"]:
            stats["accepted"] = True
        else:
            with torch.no_grad():
                torch._foreach_copy_(params, backup)
        return rho

    def _finish(self, stats: dict, rho: float, radius: float) -> None:
        """Radius update and counters."""
        group, st = self.param_groups[0], self.trcg_state
        stats["rho"] = rho
        st["hvps"] += stats["hvps"]
        if stats["exit"] != "zero_gradient":
            st["radius"] = update_radius(
                radius, rho, stats["exit"], stats["step_norm"], shrink=group["shrink"],
                expand=group["expand"], shrink_below=group["shrink_below"],
                expand_above=group["expand_above"], min_radius=group["min_radius"],
                max_radius=group["max_radius"])
        st["steps"] += 1
        st["accepted_steps"] += int(stats["accepted"])
        st["syncs"] += self._syncs
        stats.update(radius=st["radius"], syncs=self._syncs)
        self.last_stats = stats

    # ---- checkpointing ----------------------------------------------------------------

    def state_dict(self):
        sd = super().state_dict()
        sd["trcg"] = {k: self.trcg_state[k] for k in _GLOBAL_KEYS}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("trcg", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.trcg_state.update(extra)
