"""OASIS (Jahani et al., "Doubly Adaptive Scaled Algorithm for Machine Learning Using
Second-Order Information", ICLR 2022): a Hutchinson-diagonal preconditioner with the
adaptive, tuning-free step size of Malitsky & Mishchenko measured in the preconditioner's
norm."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ._common import (all_reduce_mean_, check_beta, check_lr, check_pos, distributed, hutchinson_diag,
                      params_with_grad, probe_seed)


class OASIS(torch.optim.Optimizer):
    """Closure API: ``closure()`` must zero the grads, compute the loss and call
    ``loss.backward(create_graph=True)``, and return the loss.

    Per step k (paper, Algorithm 1 with the adaptive learning rate):

    * ``D_k = b2 D_{k-1} + (1 - b2) z * (H z)`` (``D_0``: ``init_samples`` probes at w_0);
      ``Dh_k = max(|D_k|, alpha)`` element-wise;
    * ``eta_k = min(sqrt(1 + theta_{k-1}) eta_{k-1},
      ||w_k - w_{k-1}||_{Dh_k} / (2 ||g_k - g_{k-1}||*_{Dh_k}))`` with
      ``||x||_D^2 = x'Dx``, ``||x||*_D^2 = x'D^{-1}x``, ``theta_k = eta_k / eta_{k-1}``
      (``theta_0 = +inf``), so only the first step uses ``lr`` (eta_0);
    * ``w_{k+1} = w_k - eta_k Dh_k^{-1} g_k``.

    Defaults: lr (eta_0) = 1e-3, beta2 = 0.99, alpha = 1e-5 (truncation), init_samples = 10.
    One parameter group. DDP: shared probe seed, estimate and gradients averaged across
    ranks (do not wrap the model in DDP: the HVP needs the local graph).
    """

    def __init__(self, params, lr: float = 1e-3, beta2: float = 0.99, alpha: float = 1e-5, *,
                 init_samples: int = 10, distribution: str = "rademacher", seed: int = 0,
                 sync_grads: bool | None = None):
        check_lr(lr)
        check_pos("lr", lr)
        check_beta("beta2", beta2)
        check_pos("alpha", alpha)
        if init_samples < 1:
            raise ValueError("init_samples must be >= 1")
        super().__init__(params, dict(lr=lr, beta2=beta2, alpha=alpha))
        if len(self.param_groups) != 1:
            raise ValueError("OASIS supports one parameter group (its step size is global)")
        self.init_samples, self.distribution, self.seed, self.sync_grads = (
            init_samples, distribution, seed, sync_grads)

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
        if (self.sync_grads is None and distributed()) or self.sync_grads:
            all_reduce_mean_(grads)
        beta2, alpha = group["beta2"], group["alpha"]
        states = [self.state[p] for p in params]
        for st, e in zip(states, est):
            if first:
                st["D"] = e
            else:
                st["D"].mul_(beta2).add_(e, alpha=1.0 - beta2)
        dh = [st["D"].abs().clamp(min=alpha) for st in states]
        if first:
            eta = float(group["lr"])
            theta = math.inf
        else:
            eta_prev, theta_prev = group["eta"], group["theta"]
            num = sum(float(((p.detach().float() - st["prev_w"]).square() * d).sum())
                      for p, st, d in zip(params, states, dh))
            den = sum(float(((g - st["prev_g"]).square() / d).sum()) for g, st, d in zip(grads, states, dh))
            if num > 0 and den > 0:
                bound = math.sqrt(num) / (2.0 * math.sqrt(den))
                eta = min(math.sqrt(1.0 + theta_prev) * eta_prev, bound)
            else:
                # No movement or no gradient change (e.g. at a stationary point) carries no
                # curvature information: keep the step size. A zero bound made eta 0 and the
                # next theta = eta / eta_prev divide by zero (step 117 of bench_finetune); an
                # infinite one made eta infinite after the first step (theta_0 = inf).
                eta = eta_prev
            theta = eta / eta_prev
        for p, st, g, d in zip(params, states, grads, dh):
            st["prev_w"] = p.detach().float().clone()
            st["prev_g"] = g.clone()
            p.sub_((eta * g / d).to(p.dtype))
            p.grad = p.grad.detach()
        group["eta"], group["theta"], group["step_count"] = eta, theta, k + 1
        return loss
