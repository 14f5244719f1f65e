"""HyperAdamW: AdamW whose step size is learned during training, so it has no learning rate.

The step size follows the hypergradient (Baydin et al., "Online Learning Rate Adaptation with
Hypergradient Descent", ICLR 2018): with ``theta_t = theta_{t-1} - s d_{t-1}``, the derivative
of the loss at ``theta_t`` with respect to ``log s`` is ``-s <g_t, d_{t-1}>``. This class takes
the *normalised* form of that signal -- the cosine between the new gradient and the step just
applied -- and moves ``log s`` by a fixed fraction of it every step::

    log s  <-  clip(log s + rate * cos(g_t, d_{t-1}), log(min_step), log(max_step))

so the step grows while successive gradients keep pointing along the last step (too short)
and shrinks when they turn against it (overshoot). The cosine is scale-free: the update is the
same for a loss multiplied by any constant, a model of any width, or parameters of any scale,
which is why the two constants (``rate``, ``init_step``) are not per-model knobs. The direction
``d`` is AdamW's: bias-corrected ``m / (sqrt(v) + eps)`` plus decoupled weight decay
``wd * p``. ``d_{t-1}`` is recomputed from the moments in the state before they are updated,
so the memory is AdamW's (two fp32 buffers per parameter) plus one scalar.

There is no ``lr`` argument. ``param_groups[i]["lr"]`` exists only as a dimensionless factor on
``s`` (1.0) that a learning-rate *schedule* may scale (warm-up, cosine decay): the CLI applies
its usual warm-up + cosine schedule to it. Measured defaults (``bench/bench_finetune.py``):
``rate=0.4``, ``init_step=1e-3``; the adaptation is fast enough that ``init_step`` 1e-4 or
1e-2 end within a few percent of each other.

The step size is one scalar for all parameters (all groups), computed from the full gradient:
under DDP (gradients already averaged by DDP, or by any all-reduce before ``step``) every
rank computes the same value with no extra communication. A step whose gradient holds a
NaN/Inf changes nothing (parameters, moments, step size) and is counted in ``skipped_steps``;
no host sync is needed for that. Parameters may be fp32, bf16 or fp16: the moments and the
arithmetic are fp32, the parameter is rounded once per step.
"""
from __future__ import annotations

import math

import torch

from ._common import (GuardedOptimizer, by_device_dtype, check_beta, check_nonneg, check_pos,
                      keep_where, params_with_grad)


class HyperAdamW(GuardedOptimizer):
    """AdamW with a hypergradient-adapted global step size and no learning rate (see the
    module docstring for the update).

    Args:
        params: parameters or parameter groups (groups may differ in ``betas``, ``eps``,
            ``weight_decay``; the step size is shared).
        betas, eps, weight_decay: AdamW's (decoupled weight decay, scaled by the step size).
        rate: how far ``log s`` moves per step per unit of cosine (0.4).
        init_step: the step size of the first step (1e-3).
        min_step, max_step: bounds on ``s`` (1e-7, 1.0).
    """

    _name = "HyperAdamW"

    # driving contract (llmopt_ext.optim.driver)
    step_kind = "backward"
    lr_free = True
    lr_schedulable = True   # a schedule scales the dimensionless group["lr"] factor on s
    default_lr = None

    def __init__(self, params, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rate: float = 0.4, init_step: float = 1e-3,
                 min_step: float = 1e-7, max_step: float = 1.0):
        check_pos("rate", rate)
        check_pos("init_step", init_step)
        check_pos("min_step", min_step)
        check_pos("max_step", max_step)
        if not min_step <= init_step <= max_step:
            raise ValueError(f"Invalid init_step: {init_step} (expected min_step <= init_step "
                             f"<= max_step, here {min_step} and {max_step})")
        super().__init__(params, dict(lr=1.0, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.rate, self.init_step = float(rate), float(init_step)
        self.min_step, self.max_step = float(min_step), float(max_step)
        # one scalar for the whole optimizer, kept in the state_dict (see state_dict below)
        self._log_step: torch.Tensor | None = None
        self._t: torch.Tensor | None = None   # steps taken, skipped ones not counted

    def _check_group(self, group: dict) -> None:
        check_nonneg("lr (the schedule factor on the step size)", float(group["lr"]))
        check_beta("beta1", group["betas"][0])
        check_beta("beta2", group["betas"][1])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])

    # ------------------------------------------------------------------ the scalar's state

    @property
    def step_size(self) -> float:
        """The current step size s (before the schedule factor); one host sync."""
        if self._log_step is None:
            return self.init_step
        return float(self._log_step.exp())

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["hyper"] = {"log_step": None if self._log_step is None else self._log_step.detach().cpu().clone(),
                       "t": None if self._t is None else self._t.detach().cpu().clone()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        hyper = state_dict.get("hyper")
        if hyper is None:
            raise ValueError("HyperAdamW.load_state_dict: no 'hyper' entry (the step size): a "
                             "state_dict of another optimizer")
        sd = {k: v for k, v in state_dict.items() if k != "hyper"}
        super().load_state_dict(sd)
        ls, t = hyper["log_step"], hyper["t"]
        self._log_step = None if ls is None else torch.as_tensor(ls, dtype=torch.float32).clone()
        self._t = None if t is None else torch.as_tensor(t, dtype=torch.float32).clone()

    # ------------------------------------------------------------------ the step

    @staticmethod
    def _direction(group, m, v, p32, t, dev):
        """AdamW's direction from the moments after ``t`` steps (a 0-d tensor):
        m_hat / (sqrt(v_hat) + eps) + wd * p, with m_hat = m / (1 - b1^t) (0 when t = 0)."""
        b1, b2 = group["betas"]
        bc1 = (1 - torch.full((), b1, device=dev) ** t).clamp_min(1e-30)
        bc2 = (1 - torch.full((), b2, device=dev) ** t).clamp_min(1e-30)
        d = torch._foreach_div(m, bc1.to(m[0].device))
        den = torch._foreach_sqrt(torch._foreach_div(v, bc2.to(v[0].device)))
        torch._foreach_add_(den, group["eps"])
        torch._foreach_div_(d, den)
        if group["weight_decay"]:
            torch._foreach_add_(d, p32, alpha=group["weight_decay"])
        return d

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []   # (group, params, grads32, params32, exp_avg, exp_avg_sq) per device/dtype
        for group in self.param_groups:
            ps = params_with_grad(self._name, group)
            for idx in by_device_dtype(ps).values():
                gp = [ps[i] for i in idx]
                for p in gp:
                    if not self.state[p]:
                        self.state[p]["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                        self.state[p]["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                work.append((group, gp, [p.grad.float() for p in gp], [p.float() for p in gp],
                             [self.state[p]["exp_avg"] for p in gp],
                             [self.state[p]["exp_avg_sq"] for p in gp]))
        if not work:
            return loss
        dev = work[0][1][0].device
        flag = self._step_flag([g for w in work for g in w[2]], dev)
        if self._log_step is None:
            self._log_step = torch.tensor(math.log(self.init_step), dtype=torch.float32)
            self._t = torch.zeros((), dtype=torch.float32)
        log_s, t = self._log_step.to(dev), self._t.to(dev)

        # 1. the hypergradient: cosine between this gradient and the step just applied (on
        #    the first step the moments are zero, so is d, and the cosine is 0)
        dot = torch.zeros((), dtype=torch.float32, device=dev)
        nd, ng = dot.clone(), dot.clone()
        for group, _, g32, p32, m, v in work:
            d = self._direction(group, m, v, p32, t, dev)
            dot += _dot(d, g32).to(dev)
            nd += _dot(d, d).to(dev)
            ng += _dot(g32, g32).to(dev)
        den = (nd * ng).sqrt()
        cos = torch.where(den > 0, dot / den.clamp_min(1e-30), torch.zeros_like(den))
        new_log_s = (log_s + self.rate * cos).clamp(math.log(self.min_step),
                                                    math.log(self.max_step))
        s = new_log_s.exp()

        # 2. AdamW with step size s * (schedule factor)
        t1 = t + 1
        for group, ps, g32, p32, m, v in work:
            b1, b2 = group["betas"]
            new_m = torch._foreach_mul(m, b1)
            torch._foreach_add_(new_m, g32, alpha=1 - b1)
            new_v = torch._foreach_mul(v, b2)
            torch._foreach_addcmul_(new_v, g32, g32, value=1 - b2)
            d = self._direction(group, new_m, new_v, p32, t1, dev)
            step = (s * group["lr"]).to(ps[0].device)
            torch._foreach_mul_(d, step)
            new_p = torch._foreach_sub(p32, d)
            _commit(flag, m, new_m)
            _commit(flag, v, new_v)
            _commit(flag, ps, new_p)   # the copy rounds the fp32 result once to p's dtype
        _commit(flag, [log_s, t], [new_log_s, t1])   # a skipped step is not counted
        self._log_step, self._t = log_s, t
        return loss


def _commit(flag: torch.Tensor, olds: list[torch.Tensor], news: list[torch.Tensor]) -> None:
    """``olds <- news`` unless ``flag`` says the step is skipped. On the CPU the flag is read
    (no device to wait for) and the copy is one fused call; elsewhere ``keep_where`` decides
    on the device, without a host sync. The values written are the same either way."""
    if flag.device.type == "cpu":
        if not bool(flag):
            torch._foreach_copy_(olds, news)
    else:
        keep_where(flag, olds, news)


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """sum_i <a_i, b_i> in float32, as one 0-d tensor."""
    if not a:
        return torch.zeros(())
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).sum()
