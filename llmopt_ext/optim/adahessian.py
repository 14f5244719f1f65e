"""AdaHessian (Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
Learning", AAAI 2021) on the fused ``adahessian_update_`` op."""
from __future__ import annotations

from typing import Callable

import torch

from ..ops import adahessian_update_
from ._common import (GuardedOptimizer, all_reduce_mean_, amp_tensors, by_device_dtype,
                      check_adam_group, combine_flags, distributed, hutchinson_diag, keep_where,
                      params_with_grad, probe_seed)


class AdaHessian(GuardedOptimizer):
    """Adam with the squared Hutchinson estimate of diag(H) in place of g*g:

    ``m <- b1 m + (1 - b1) g``; ``v <- b2 v + (1 - b2) D^2`` with ``D = z * (H z)``;
    ``p <- p (1 - lr wd) - lr / (1 - b1^t) * m / ((v / (1 - b2^t))^(k/2) + eps)``.

    Use after ``loss.backward(create_graph=True)``. Defaults from the paper / official
    code: lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0, hessian_power k=1,
    update_each=1 (refresh D every n steps, reuse it in between), n_samples=1 Rademacher
    probes per refresh. 4-D (conv) weights average |D| over the kernel's spatial dims, as
    the official code does.

    ``step(hessian=...)`` takes an externally computed D instead (one tensor per param).
    DDP: probes are seeded with (seed, step) — the same on every rank — and D is averaged
    across ranks; do not wrap the model in DDP (the HVP needs the local graph), the
    gradients are averaged here when torch.distributed is initialised (sync_grads).
    GradScaler: supported without a host sync (g and D are divided by the scale).
    A step whose gradient or D holds a NaN/Inf is skipped on the device (one flag passed to
    the fused update as ``found_inf``; no host sync) and counted in ``skipped_steps``.
    With ``update_each > 1``, a parameter whose first gradient comes on a step without a fresh
    D is left alone until the next refresh step.
    """

    _name = "AdaHessian"

    _step_supports_amp_scaling = True
    # driving contract (llmopt_ext.optim.driver)
    step_kind = "backward_graph"
    default_lr = 0.15
    uses_hvp = True
    accepts_grad_clipping = False

    def needs_graph(self) -> bool:
        """The graph is needed on the steps that refresh the Hessian estimate."""
        return self.param_groups[0].get("step_count", 0) % self.update_each == 0

    def __init__(self, params, lr: float = 0.15, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-4, weight_decay: float = 0.0, hessian_power: float = 1.0,
                 update_each: int = 1, n_samples: int = 1, *, seed: int = 0,
                 sync_grads: bool | None = None):
        if update_each < 1 or n_samples < 1:
            raise ValueError("update_each and n_samples must be >= 1")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      hessian_power=hessian_power))
        self.update_each, self.n_samples, self.seed, self.sync_grads = update_each, n_samples, seed, sync_grads

    def _check_group(self, group: dict) -> None:
        check_adam_group(group)
        if not 0.0 < group["hessian_power"] <= 1.0:
            raise ValueError(f"Invalid hessian_power: {group['hessian_power']} (expected a value in (0, 1])")

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if len(st) == 0:
            # step on the param's device: the CUDA kernel reads it (no host sync under AMP)
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            st["exp_hessian_diag_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                                         memory_format=torch.contiguous_format)
        return st

    @staticmethod
    def _conv_average(d: torch.Tensor) -> torch.Tensor:
        if d.dim() == 4:  # official AdaHessian: spatial averaging for conv kernels
            return d.abs().mean(dim=[2, 3], keepdim=True).expand_as(d).contiguous()
        return d

    def _estimate(self, params, hessian, count):
        """This step's D (a list, float32) or None when the cached one is reused."""
        if hessian is not None:
            return [h.float() for h in hessian]
        if count % self.update_each == 0:
            with torch.enable_grad():
                return hutchinson_diag(params, [p.grad for p in params],
                                       seed=probe_seed(self.seed, count, 0), n_samples=self.n_samples)
        return None

    def _store_estimate(self, params, ds, flag) -> None:
        """Cache D; on a skipped step an existing cache is kept (a first estimate is stored
        as is: if it is non-finite, the steps that reuse it are skipped too)."""
        for p, d in zip(params, ds):
            st, d = self._state(p), self._conv_average(d)
            if "hessian" in st:
                keep_where(flag, [st["hessian"]], [d])
            else:
                st["hessian"] = d

    @torch.no_grad()
    def step(self, closure: Callable | None = None, hessian: list[torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in params_with_grad("AdaHessian", g)]
        if not params:
            return loss
        count = self.param_groups[0].setdefault("step_count", 0)
        ds = self._estimate(params, hessian, count)
        for p in params:
            if p.grad.requires_grad:
                p.grad = p.grad.detach()
        if (self.sync_grads is None and distributed()) or self.sync_grads:
            all_reduce_mean_([p.grad for p in params])
        if ds is None:
            # no fresh estimate: a parameter whose first gradient arrives now has no D yet and
            # waits for the next refresh step (not updated, no state created)
            params = [p for p in params if "hessian" in self.state[p]]
            used = [self.state[p]["hessian"] for p in params]
        else:
            used = ds
        if params:  # one flag, after the all-reduce: every rank takes the same decision
            flag = self._step_flag([p.grad for p in params] + list(used), params[0].device)
            if ds is not None:
                self._store_estimate(params, ds, flag)
            self._update(set(map(id, params)), flag)
        self.param_groups[0]["step_count"] = count + 1
        return loss

    def _update(self, ids: set, flag: torch.Tensor) -> None:
        """The fused update of the params in `ids`, skipped where `flag` is set."""
        for group in self.param_groups:
            gp = [p for p in params_with_grad("AdaHessian", group) if id(p) in ids]
            for (device, _), idx in by_device_dtype(gp).items():
                ps = [gp[i] for i in idx]
                sts = [self._state(p) for p in ps]
                steps = [st["step"] for st in sts]
                gs, fi = amp_tensors(self, device)
                skip = combine_flags(flag.to(device, non_blocking=True), fi)
                torch._foreach_add_(steps, 1.0 - skip.reshape(()))  # a skipped step does not count
                beta1, beta2 = group["betas"]
                adahessian_update_(
                    ps, [p.grad for p in ps], [st["exp_avg"] for st in sts],
                    [st["exp_hessian_diag_sq"] for st in sts], [st["hessian"] for st in sts],
                    step=steps[0], lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"], eps=group["eps"],
                    hessian_power=group["hessian_power"], grad_scale=gs, found_inf=skip)
