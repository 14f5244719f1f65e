"""Sophia (Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language
Model Pre-training", 2023): SophiaG with the Gauss-Newton-Bartlett (GNB) estimator and
SophiaH with Hutchinson's, both running the fused ``sophia_update_`` op (fp32 state and
math, so fp16/bf16 params do not go NaN as in the reference code, Sophia issue #16)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..ops import sophia_update_
from ._common import (GuardedOptimizer, all_reduce_mean_, amp_tensors, by_device_dtype, check_beta,
                      check_lr, check_nonneg, check_pos, combine_flags, distributed, hutchinson_diag,
                      keep_where, params_with_grad, probe_seed)


def gnb_loss(logits: torch.Tensor, *, generator: torch.Generator | None = None,
             ignore_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of the Gauss-Newton-Bartlett estimator: cross-entropy of `logits` against labels
    SAMPLED from softmax(logits) (not the data labels). Backpropagating it and squaring the
    gradient (``SophiaG.update_hessian()``) estimates diag of the Gauss-Newton matrix times
    the batch size B, which is why SophiaG's update uses rho * bs * h.

    logits: (..., vocab); ignore_mask (optional, same leading shape): True where the token
    does not count (padding)."""
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        probs = torch.softmax(flat.float(), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if ignore_mask is not None:
            labels = labels.masked_fill(ignore_mask.reshape(-1), -100)
    return F.cross_entropy(flat, labels, ignore_index=-100)



def _check_sophia_hyper(lr, betas, rho, weight_decay, eps) -> None:
    """The hyper-parameter checks SophiaG and SophiaH share."""
    check_lr(lr)
    check_beta("beta1", betas[0])
    check_beta("beta2", betas[1])
    check_pos("rho", rho)
    check_nonneg("weight_decay", weight_decay)
    check_nonneg("eps", eps)


class _SophiaBase(GuardedOptimizer):
    """Shared by SophiaG and SophiaH. A step whose gradients (or Hessian estimate) hold a
    NaN/Inf is skipped on the device: one flag, passed to the fused update as its
    ``found_inf`` and applied to the Hessian EMA with ``where``, so no host sync."""

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf
    _name = "Sophia"

    def _check_group(self, group: dict) -> None:
        _check_sophia_hyper(group["lr"], group["betas"], group["rho"], group["weight_decay"], group["eps"])

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in params_with_grad(self._name, g)]

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            # on the param's device: a skipped step is undone there without a host sync
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["hessian"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    def _fused_step(self, group: dict, rho: float, clip: bool, flag: torch.Tensor) -> None:
        """The fused update of `group`, skipped where `flag` (this step's skip flag) is set."""
        params = params_with_grad(self._name, group)
        if not params:
            return
        states = [self._init_state(p) for p in params]
        beta1 = group["betas"][0]
        for (device, _), idx in by_device_dtype(params).items():
            gs, fi = amp_tensors(self, device)
            skip = combine_flags(flag.to(device, non_blocking=True), fi)
            torch._foreach_add_([states[i]["step"] for i in idx], 1.0 - skip.reshape(()))
            sophia_update_(
                [params[i] for i in idx], [params[i].grad for i in idx],
                [states[i]["exp_avg"] for i in idx], [states[i]["hessian"] for i in idx],
                lr=float(group["lr"]), beta1=beta1, rho=rho, weight_decay=group["weight_decay"],
                eps=group["eps"], clip=clip, grad_scale=gs, found_inf=skip)


class SophiaG(_SophiaBase):
    """SophiaG: sign-clipped momentum preconditioned by a GNB Hessian-diagonal EMA.

    Per step (official rule): ``m <- b1 m + (1 - b1) g``; ``p <- p (1 - lr wd)``;
    ``p <- p - lr sign(m) min(|m| / (rho bs h + eps), 1)``. So no element moves by more than
    ``lr`` per step (plus weight decay).

    Every k steps (official: k = 10) refresh ``h`` with the GNB estimate::

        logits = model(x)
        loss_gnb = llmopt_ext.optim.gnb_loss(logits)    # labels sampled from the model
        optimizer.zero_grad(); loss_gnb.backward()
        optimizer.update_hessian()                      # h <- b2 h + (1 - b2) g*g

    or ``optimizer.update_hessian_from_logits(logits)`` for the three lines. Driven by
    :func:`llmopt_ext.optim.drive_step` with a ``StepContext(logits=...)``, the refresh runs
    by itself after every ``update_period``-th step, its labels drawn from a generator seeded
    with ``seed`` (saved in ``state_dict``, so a resumed run draws the same labels).

    Args (defaults from the official code): lr=1e-4, betas=(0.965, 0.99), rho=0.04,
    weight_decay=0.1, bs: tokens per batch (the B of rho * B * h; required, overridable
    per ``step(bs=...)``), eps=1e-15, update_period=10 (the official k), seed=0.
    Under DDP wrap the model as usual: the GNB gradients are averaged by DDP's backward.
    """

    _name = "SophiaG"
    # driving contract (llmopt_ext.optim.driver). 2e-3 for LoRA fine-tuning: the official 1e-4
    # is a pretraining value; 2e-3 bounds each element's step as AdamW's default rate does.
    default_lr = 2e-3
    accepts_grad_clipping = False  # the update clips itself, element-wise

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 1e-1, *, bs: int, eps: float = 1e-15,
                 update_period: int = 10, seed: int = 0):
        if update_period < 1:
            raise ValueError(f"Invalid update_period: {update_period} (expected >= 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay,
                                      bs=bs, eps=eps))
        self.update_period, self.seed = update_period, seed
        self._gnb_gen: torch.Generator | None = None
        self._gnb_gen_state: torch.Tensor | None = None  # loaded before the device is known

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_pos("bs", group["bs"])

    def step_kwargs(self, ctx) -> dict:
        return {"bs": ctx.n_tokens} if ctx.n_tokens else {}

    def after_step(self, ctx) -> None:
        """GNB refresh after every update_period-th step, when the caller passes the logits."""
        if ctx.logits is None or self.param_groups[0].get("step_count", 0) % self.update_period:
            return
        logits, ignore_mask = ctx.logits()
        self.update_hessian_from_logits(logits, generator=self._generator(logits.device),
                                        ignore_mask=ignore_mask)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gnb_gen is None or self._gnb_gen.device != device:
            self._gnb_gen = torch.Generator(device=device).manual_seed(self.seed)
            if self._gnb_gen_state is not None:
                self._gnb_gen.set_state(self._gnb_gen_state)
                self._gnb_gen_state = None
        return self._gnb_gen

    def state_dict(self) -> dict:
        sd = super().state_dict()
        gen = self._gnb_gen.get_state() if self._gnb_gen is not None else self._gnb_gen_state
        if gen is not None:
            sd["gnb_generator"] = gen.clone()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        gen = state_dict.pop("gnb_generator", None)
        super().load_state_dict(state_dict)
        self._gnb_gen, self._gnb_gen_state = None, gen

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h <- beta2 h + (1 - beta2) g * g, with g the current .grad (of the GNB loss); left
        unchanged (and counted as a skip) when a GNB gradient is NaN/Inf."""
        params = self._all_params()
        if not params:
            return
        flag = self._step_flag([p.grad for p in params], params[0].device)
        for group in self.param_groups:
            params = params_with_grad(self._name, group)
            if not params:
                continue
            hs = [self._init_state(p)["hessian"] for p in params]
            gs = [p.grad.float() for p in params]
            beta2 = group["betas"][1]
            new = torch._foreach_mul(hs, beta2)
            torch._foreach_addcmul_(new, gs, gs, value=1.0 - beta2)
            keep_where(flag, hs, new)

    def update_hessian_from_logits(self, logits: torch.Tensor, *,
                                   generator: torch.Generator | None = None,
                                   ignore_mask: torch.Tensor | None = None) -> None:
        """zero_grad, backward of :func:`gnb_loss`, update_hessian, zero_grad."""
        self.zero_grad(set_to_none=True)
        gnb_loss(logits, generator=generator, ignore_mask=ignore_mask).backward()
        self.update_hessian()
        self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable | None = None, bs: int | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if bs is not None:
            check_pos("bs", bs)
        params = self._all_params()
        flag = self._step_flag([p.grad for p in params], params[0].device) if params else None
        for group in self.param_groups:
            b = group["bs"] if bs is None else bs
            self._fused_step(group, group["rho"] * b, clip=False, flag=flag)
        self.param_groups[0]["step_count"] = self.param_groups[0].get("step_count", 0) + 1
        return loss


class SophiaH(_SophiaBase):
    """SophiaH: Sophia with Hutchinson's estimate of the Hessian diagonal (the variant of
    the paper's Algorithm 1, and pytorch-optimizer's SophiaH):

    every ``update_period`` steps (first step included) ``h <- b2 h + (1 - b2) z*(Hz)``,
    then ``m <- b1 m + (1 - b1) g``; ``p <- p (1 - lr wd) - lr clamp(m / max(h, eps), -rho, rho)``.

    Call ``loss.backward(create_graph=True)`` before a step that refreshes h (or pass
    ``hessian=`` with your own estimate). Defaults: lr=6e-2, betas=(0.96, 0.99), rho=1e-2
    (the clip), weight_decay=0, update_period=10, n_samples=1, Gaussian probes, eps=1e-12.

    DDP: the probes come from a generator seeded with (seed, step), identical on every
    rank, and the estimate is averaged across ranks. Because the Hessian-vector product
    needs the local, graph-carrying gradient, do not wrap the model in DDP; the optimizer
    averages the gradients itself when torch.distributed is initialised (sync_grads).
    """

    _name = "SophiaH"
    # driving contract (llmopt_ext.optim.driver)
    step_kind = "backward_graph"
    default_lr = 6e-2
    uses_hvp = True
    supports_grad_scaler = False  # the Hutchinson product would see scaled gradients
    accepts_grad_clipping = False

    def needs_graph(self) -> bool:
        """The graph is needed on the steps that refresh the Hessian estimate."""
        return self.param_groups[0].get("step_count", 0) % self.update_period == 0

    def __init__(self, params, lr: float = 6e-2, betas: tuple[float, float] = (0.96, 0.99),
                 rho: float = 1e-2, weight_decay: float = 0.0, *, update_period: int = 10,
                 n_samples: int = 1, distribution: str = "gaussian", eps: float = 1e-12,
                 seed: int = 0, sync_grads: bool | None = None):
        if update_period < 1 or n_samples < 1:
            raise ValueError("update_period and n_samples must be >= 1")
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"Invalid distribution: {distribution!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay,
                                      eps=eps))
        self.update_period, self.n_samples, self.distribution = update_period, n_samples, distribution
        self.seed, self.sync_grads = seed, sync_grads

    @torch.no_grad()
    def step(self, closure: Callable | None = None, hessian: list[torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._all_params()
        count = self.param_groups[0].setdefault("step_count", 0)
        refresh = hessian is not None or count % self.update_period == 0
        if refresh and params and hessian is None:
            with torch.enable_grad():
                hessian = hutchinson_diag(params, [p.grad for p in params],
                                          seed=probe_seed(self.seed, count, 0),
                                          n_samples=self.n_samples, distribution=self.distribution)
        for p in params:
            if p.grad.requires_grad:
                p.grad = p.grad.detach()
        if (self.sync_grads is None and distributed()) or self.sync_grads:
            all_reduce_mean_([p.grad for p in params])
        if params:  # after the all-reduce: every rank takes the same decision
            flag = self._step_flag([p.grad for p in params] + list(hessian if refresh else []),
                                   params[0].device)
            if refresh:
                self._update_ema(params, hessian, flag)
            for group in self.param_groups:
                self._fused_step(group, group["rho"], clip=True, flag=flag)
        self.param_groups[0]["step_count"] = count + 1
        return loss

    def _update_ema(self, params: list[torch.Tensor], hessian, flag: torch.Tensor) -> None:
        """h <- lerp(h, estimate, 1 - beta2), kept where `flag` is set."""
        by_param = dict(zip(map(id, params), hessian))
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in params_with_grad(self._name, group):
                h = self._init_state(p)["hessian"]
                keep_where(flag, [h], [torch.lerp(h, by_param[id(p)].float(), 1.0 - beta2)])
