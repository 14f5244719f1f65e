"""AI-SARAH (Shi, Sadiev, Loizou, Richtárik, Takáč, "AI-SARAH: Adaptive and Implicit
Stochastic Recursive Gradient Methods", TMLR 2023): SARAH's recursive gradient estimate
with a step size chosen implicitly from local curvature, no learning rate to tune."""
from __future__ import annotations

from typing import Callable

import torch

from ._common import GuardedOptimizer, all_reduce_mean_, check_beta, check_pos, distributed, nonfinite_flag


class AISARAH(GuardedOptimizer):
    """Closure API: ``closure()`` returns the loss of the CURRENT mini-batch at the current
    parameters (no backward; it is called twice per step, at w_{t-1} and at w_t, and must use
    the same mini-batch both times). ``full_closure`` (optional, passed to ``step``) returns
    the full-data loss, or an iterable of equally weighted per-chunk losses (a generator:
    each is differentiated and freed before the next is computed, so memory stays at one
    chunk's graph); it is used when an outer loop starts. Without it the outer loop starts
    from the current mini-batch's gradient, whose noise the recursive estimate then carries
    until the next restart.

    Per inner step t (paper, Algorithm 2, practical version):

    * local step: ``alpha = v'Hv / ||Hv||^2`` at w_{t-1} on the mini-batch — one Newton
      step on ``xi(a) = ||grad f_S(w - a v) - grad f_S(w) + v||^2`` at a = 0;
    * upper bound: ``alpha_max`` = bias-corrected harmonic moving average of the local steps
      (beta = 0.999); ``alpha = min(alpha, alpha_max)``;
    * ``w_t = w_{t-1} - alpha v``; ``v <- grad f_S(w_t) - grad f_S(w_{t-1}) + v``;
    * the outer loop restarts (v = full gradient) when ``||v||^2 < gamma ||v_0||^2``
      (gamma = 1/32) or after ``max_inner`` steps.

    One parameter group; float32 parameters. DDP: gradients and HVPs are averaged across
    ranks here (do not wrap the model in DDP).

    A step whose loss, gradient or HVP is NaN/Inf (at w_{t-1} or at the new point) is
    skipped: parameters and state stay as they were, ``skipped_steps`` counts it.
    """

    _name = "AISARAH"

    # driving contract (llmopt_ext.optim.driver): no learning rate; the closure returns the loss
    step_kind = "closure_loss"
    lr_free = True
    uses_hvp = True
    supports_grad_scaler = False

    def step_kwargs(self, ctx) -> dict:
        """The anchor sample's loss as the outer loop's full gradient, when the caller has one."""
        return {"full_closure": ctx.full_loss} if ctx.full_loss is not None else {}

    def __init__(self, params, gamma: float = 1.0 / 32, beta: float = 0.999, *,
                 max_inner: int = 1000, sync_grads: bool | None = None):
        super().__init__(params, dict(gamma=gamma, beta=beta, max_inner=max_inner))
        if len(self.param_groups) != 1:
            raise ValueError("AISARAH supports one parameter group")
        self.sync_grads = sync_grads

    def _check_group(self, group: dict) -> None:
        check_pos("gamma", group["gamma"])
        check_beta("beta", group["beta"])
        if group["max_inner"] < 1:
            raise ValueError(f"Invalid max_inner: {group['max_inner']} (expected >= 1)")

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("AISARAH supports one parameter group")
        super().add_param_group(param_group)

    def _state_shaped_like_param(self, key: str) -> bool:
        return key != "v"  # a list (one tensor per parameter), checked in load_state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        for st in state_dict["state"].values():
            v = st.get("v")
            if v is not None and [tuple(t.shape) for t in v] != [tuple(p.shape) for p in params]:
                raise ValueError("AISARAH.load_state_dict: state 'v' has shapes "
                                 f"{[tuple(t.shape) for t in v]}, the parameters "
                                 f"{[tuple(p.shape) for p in params]} (another parameter layout)")
        super().load_state_dict(state_dict)

    def _sync(self) -> bool:
        return bool(self.sync_grads) or (self.sync_grads is None and distributed())

    def _grad(self, loss_fn: Callable, params, create_graph: bool):
        with torch.enable_grad():
            loss = loss_fn()
            gs = torch.autograd.grad(loss, params, create_graph=create_graph)
        return loss, list(gs)

    def _full_grad(self, full_closure: Callable, params) -> list[torch.Tensor]:
        """Gradient of full_closure()'s loss, or the mean gradient of the losses it yields."""
        with torch.enable_grad():
            out = full_closure()
            if torch.is_tensor(out):
                return [g.detach() for g in torch.autograd.grad(out, params)]
            total, n = None, 0
            for loss in out:
                gs = torch.autograd.grad(loss, params)
                total = [g.detach().clone() for g in gs] if total is None else \
                    [t.add_(g) for t, g in zip(total, gs)]
                n += 1
        if n == 0:
            raise ValueError("AISARAH: full_closure yielded no losses")
        return [t.div_(n) for t in total]

    @torch.no_grad()
    def step(self, closure: Callable, full_closure: Callable | None = None):
        if closure is None:
            raise RuntimeError("AISARAH needs a closure returning the mini-batch loss")
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.requires_grad]
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError("AISARAH does not support sparse gradients")
        st = self.state[params[0]]
        restart = None  # the outer-loop state, stored only if the step is taken
        if "v" not in st or st["restart"]:
            v = self._full_grad(full_closure or closure, params)
            if self._sync():
                all_reduce_mean_(v)
            restart = dict(v=v, v0_sq=sum(float(g.square().sum()) for g in v), inner=0, restart=False)
        v = st["v"] if restart is None else restart["v"]
        # gradient at w_{t-1} with its graph, and H v on the same mini-batch
        loss, g_prev = self._grad(closure, params, create_graph=True)
        with torch.enable_grad():
            hv = torch.autograd.grad(g_prev, params, grad_outputs=v)
        g_prev = [g.detach() for g in g_prev]
        hv = list(hv)
        if self._sync():
            all_reduce_mean_(g_prev + hv)
        if self._nonfinite([loss.detach().reshape(1), *v, *g_prev, *hv]):
            return loss
        a, alpha_state = self._local_step(st, group["beta"], v, hv)
        backup = [p.detach().clone() for p in params]  # a bitwise-exact undo if g_new is NaN
        for p, d in zip(params, v):
            p.sub_(a * d)
        _, g_new = self._grad(closure, params, create_graph=False)
        if self._sync():
            all_reduce_mean_(g_new)
        if self._nonfinite(g_new):
            for p, b in zip(params, backup):
                p.copy_(b)
            return loss
        st.update(restart or {}, **alpha_state)
        for d, gn, gp in zip(v, g_new, g_prev):
            d.add_(gn).sub_(gp)
        st["inner"] += 1
        v_sq = sum(float(d.square().sum()) for d in v)
        st["restart"] = v_sq < group["gamma"] * st["v0_sq"] or st["inner"] >= group["max_inner"]
        st["alpha"] = a
        for p, g in zip(params, g_new):
            p.grad = g.detach()
        return loss

    def _nonfinite(self, tensors: list[torch.Tensor]) -> bool:
        """One host sync; a non-finite step is counted and leaves params and state alone."""
        bad = bool(nonfinite_flag(tensors, tensors[0].device))
        self._skips().add(bad)
        return bad

    @staticmethod
    def _local_step(st: dict, beta: float, v, hv) -> tuple[float, dict]:
        """The implicit step size and the harmonic-average state it updates (not stored)."""
        vhv = sum(float((a * b).sum()) for a, b in zip(v, hv))
        hv_sq = sum(float(b.square().sum()) for b in hv)
        n = st.get("n_alpha", 0)
        if vhv > 0 and hv_sq > 0:
            a = vhv / hv_sq
            inv = beta * st.get("inv_alpha_avg", 0.0) + (1.0 - beta) / a
            n += 1
            return min(a, (1.0 - beta**n) / inv), {"inv_alpha_avg": inv, "n_alpha": n}
        # no positive curvature along v: fall back to the running bound
        return ((1.0 - beta**n) / st["inv_alpha_avg"] if n > 0 else 1e-3), {}
