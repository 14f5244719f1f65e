"""OASIS (Jahani et al., "Doubly Adaptive Scaled Algorithm for Machine Learning Using
Second-Order Information", ICLR 2022): a Hutchinson-diagonal preconditioner with the
adaptive, tuning-free step size of Malitsky & Mishchenko measured in the preconditioner's
norm."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ._common import (GuardedOptimizer, all_reduce_mean_, check_beta, check_lr, check_pos, distributed,
                      hutchinson_diag, nonfinite_flag, params_with_grad, probe_seed)


GRAD_DIFFERENCES = ("same_batch", "consecutive")


class OASIS(GuardedOptimizer):
    """Closure API: ``closure()`` must zero the grads, compute the loss and call
    ``loss.backward(create_graph=True)``, and return the loss.

    Per step k (paper, Algorithm 1 with the adaptive learning rate):

    * ``D_k = b2 D_{k-1} + (1 - b2) z * (H z)`` (``D_0``: ``init_samples`` probes at w_0);
      ``Dh_k = max(|D_k|, alpha)`` element-wise;
    * ``eta_k = min(sqrt(1 + theta_{k-1}) eta_{k-1},
      ||w_k - w_{k-1}||_{Dh_k} / (2 ||g_k - g'_{k-1}||*_{Dh_k}))`` with
      ``||x||_D^2 = x'Dx``, ``||x||*_D^2 = x'D^{-1}x``, ``theta_k = eta_k / eta_{k-1}``
      (``theta_0 = +inf``), so only the first step uses ``lr`` (eta_0);
    * ``w_{k+1} = w_k - eta_k Dh_k^{-1} g_k``.

    ``grad_difference`` chooses ``g'_{k-1}``, the gradient the local-smoothness estimate
    compares with:

    * ``"same_batch"`` (default): the gradient of step k's mini-batch at ``w_{k-1}`` (one more
      closure call per step, at the previous weights), so the difference measures curvature
      only;
    * ``"consecutive"``: ``g_{k-1}``, the previous step's gradient on ITS batch: the
      deterministic formula, one closure call per step. On mini-batches the difference is
      dominated by batch noise even when w barely moves, the bound is tiny, and since eta
      can grow by at most ``sqrt(1 + theta)`` per step it never recovers: on the embedded
      task eta fell from 1e-3 to 1e-4 in 60 steps (to 1e-18 with alpha = 1e-2) and the loss
      stalled at the base model's. With ``"same_batch"`` eta stays within 3e-4 .. 3e-2.

    ``alpha`` truncates the diagonal from below. LoRA starts with B = 0, where the loss does
    not depend on A, so A's Hessian diagonal starts at exactly 0 and grows slowly through the
    EMA: with alpha = 1e-5 the first nonzero gradients of A are divided by 1e-5, the step on A
    is huge, and the step size bound shrinks everything else to compensate (embedded task,
    same_batch: loss 4.9 -> 4.2 in 100 steps; with alpha = 1e-3: 4.9 -> ~1; 1e-2 and 1e-1
    were slightly slower). Hence the default 1e-3.

    Defaults: lr (eta_0) = 1e-3, beta2 = 0.99, alpha = 1e-3 (truncation), init_samples = 10.
    One parameter group. DDP: shared probe seed, estimate and gradients averaged across
    ranks (do not wrap the model in DDP: the HVP needs the local graph).

    A step whose loss, gradient or Hessian estimate is NaN/Inf is skipped (parameters, D,
    eta, step count unchanged) and counted in ``skipped_steps``.
    """

    _name = "OASIS"

    # driving contract (llmopt_ext.optim.driver): the closure runs its own create_graph backward
    step_kind = "closure_backward"
    default_lr = 1e-3
    lr_schedulable = False  # lr is only the first step size; OASIS adapts its own
    uses_hvp = True
    supports_grad_scaler = False

    def __init__(self, params, lr: float = 1e-3, beta2: float = 0.99, alpha: float = 1e-3, *,
                 init_samples: int = 10, distribution: str = "rademacher", seed: int = 0,
                 grad_difference: str = "same_batch", sync_grads: bool | None = None):
        if init_samples < 1:
            raise ValueError("init_samples must be >= 1")
        if grad_difference not in GRAD_DIFFERENCES:
            raise ValueError(f"grad_difference must be one of {GRAD_DIFFERENCES}, got {grad_difference!r}")
        super().__init__(params, dict(lr=lr, beta2=beta2, alpha=alpha))
        if len(self.param_groups) != 1:
            raise ValueError("OASIS supports one parameter group (its step size is global)")
        self.init_samples, self.distribution, self.seed, self.sync_grads = (
            init_samples, distribution, seed, sync_grads)
        self.grad_difference = grad_difference

    def _check_group(self, group: dict) -> None:
        check_lr(group["lr"])
        check_pos("lr", group["lr"])
        check_beta("beta2", group["beta2"])
        check_pos("alpha", group["alpha"])

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("OASIS supports one parameter group (its step size is global)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable):
        if closure is None:
            raise RuntimeError("OASIS needs a closure (it re-evaluates the gradient with its graph)")
        group = self.param_groups[0]
        with torch.enable_grad():
            loss = closure()
        params = params_with_grad("OASIS", group)
        k = group.setdefault("step_count", 0)
        first = k == 0
        with torch.enable_grad():
            est = hutchinson_diag(params, [p.grad for p in params], seed=probe_seed(self.seed, k, 0),
                                  n_samples=self.init_samples if first else 1,
                                  distribution=self.distribution)
        grads = [p.grad.detach().float() for p in params]
        sync = (self.sync_grads is None and distributed()) or self.sync_grads
        if sync:
            all_reduce_mean_(grads)
        if not first and self.grad_difference == "same_batch":
            prev_g = self._grads_at_previous_weights(closure, params, sync)
        else:
            prev_g = [self.state[p].get("prev_g") for p in params]
        # one host sync (the step size below takes several anyway); identical on every rank
        if bool(nonfinite_flag([loss.reshape(1), *grads, *est, *prev_g], params[0].device)):
            self._skips().add(True)  # parameters, D, eta and the step count stay as they were
            for p in params:
                p.grad = p.grad.detach()
            return loss
        states = [self.state[p] for p in params]
        for st, e in zip(states, est):
            if first:
                st["D"] = e
            else:
                st["D"].mul_(group["beta2"]).add_(e, alpha=1.0 - group["beta2"])
        dh = [st["D"].abs().clamp(min=group["alpha"]) for st in states]
        eta, theta = self._step_size(group, params, states, grads, prev_g, dh, first)
        for p, st, g, d in zip(params, states, grads, dh):
            st["prev_w"] = p.detach().float().clone()
            if self.grad_difference == "consecutive":
                st["prev_g"] = g.clone()
            p.sub_((eta * g / d).to(p.dtype))
            p.grad = p.grad.detach()
        group["eta"], group["theta"], group["step_count"] = eta, theta, k + 1
        return loss

    @staticmethod
    def _step_size(group, params, states, grads, prev_g, dh, first) -> tuple[float, float]:
        """(eta_k, theta_k) of the adaptive rule (class docstring)."""
        if first:
            return float(group["lr"]), math.inf
        eta_prev, theta_prev = group["eta"], group["theta"]
        num = sum(float(((p.detach().float() - st["prev_w"]).square() * d).sum())
                  for p, st, d in zip(params, states, dh))
        den = sum(float(((g - pg).square() / d).sum()) for g, pg, d in zip(grads, prev_g, dh))
        if num > 0 and den > 0:
            bound = math.sqrt(num) / (2.0 * math.sqrt(den))
            eta = min(math.sqrt(1.0 + theta_prev) * eta_prev, bound)
        else:
            # No movement or no gradient change (e.g. at a stationary point) carries no
            # curvature information: keep the step size. A zero bound made eta 0 and the
            # next theta = eta / eta_prev divide by zero (step 117 of bench_finetune); an
            # infinite one made eta infinite after the first step (theta_0 = inf).
            eta = eta_prev
        return eta, eta / eta_prev

    def _grads_at_previous_weights(self, closure: Callable, params: list, sync: bool) -> list[torch.Tensor]:
        """The gradient of the current mini-batch at ``w_{k-1}``; parameters and their .grad
        are restored afterwards (the closure must be deterministic: no dropout)."""
        now = [p.detach().clone() for p in params]
        grads_now = [p.grad.detach().clone() for p in params]
        for p in params:
            p.copy_(self.state[p]["prev_w"].to(p.dtype))
        with torch.enable_grad():
            closure()
        prev = [p.grad.detach().float() for p in params]
        if sync:
            all_reduce_mean_(prev)
        for p, w, g in zip(params, now, grads_now):
            p.copy_(w)
            p.grad = g
        return prev
