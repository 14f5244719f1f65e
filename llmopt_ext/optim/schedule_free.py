"""WidthScheduleFree: Schedule-Free AdamW whose step size comes from the model's width, so it
has no learning rate.

**The method** (Defazio et al., "The Road Less Scheduled", 2024), written here from its
equations. Three sequences: ``z`` takes AdamW-normalised steps, ``x`` is a weighted running
average of ``z`` (the weights to evaluate and save), and the gradient is taken at their
interpolation ``y``::

    y_t     = (1 - b1) z_t + b1 x_t                       (the model's weights while training)
    v_t     = b2 v_{t-1} + (1 - b2) g_t^2,  g_t = grad f(y_t)
    d_t     = g_t / (sqrt(v_t / (1 - b2^t)) + eps) + wd y_t
    z_{t+1} = z_t - a_t d_t,     a_t = s min(1, t / warmup)
    x_{t+1} = (1 - c_t) x_t + c_t z_{t+1},   c_t = a_t^2 / sum_{i<=t} a_i^2

so no schedule is needed (the averaging plays the part of the decay). Only ``y``, ``z`` and
``v`` are stored: ``x = (y - (1 - b1) z) / b1``; substituting, one step is
``y <- (1 - c) y + c z + a (b1 (1 - c) - 1) d`` and ``z <- z - a d``.

**No learning rate.** The step size is ``s = width_scale / width``: μP's rule that the Adam step
of a hidden matrix must shrink as ``1 / fan-in`` to keep the change of its output the same,
with ``width`` read off the parameters (the median, over the trainable matrices, of their
larger side: the hidden size of a LoRA-adapted transformer, where A is ``r x hidden`` and B
``hidden x r``; pass ``width=`` to override). ``width_scale = 1.28`` is 1e-2 at width 128:
Schedule-Free AdamW's best rate on the embedded 128-wide model (``bench/bench_finetune.py``,
300 steps: 0.96-0.98x the best AdamW of a 5-rate sweep), then checked without change on
SmolLM2-135M (width 576, where the rule gives 2.2e-3: 0.86-0.90x; README, "Benchmarks"). The
constant was fitted on one model and the 1/width law checked on a second, not more: a model
far from both (other LoRA scaling alpha/r, much longer runs) may want another step, and then
``width=`` is the one override. ``width`` is a property of the model, not a knob to tune.

**Exactness.** The state is float32 for every parameter dtype and holds ``y`` itself, so the
model's parameter is only ever a rounded copy: ``opt.eval()`` writes ``x`` into the parameters and
``train()`` writes ``y`` back bit-for-bit, so evaluating mid-run does not change the trajectory.
A step whose gradient holds a NaN/Inf changes nothing (parameters, state, the step count and
the averaging weights) and is counted in ``skipped_steps``. Under DDP (gradients averaged
before ``step``) every rank computes the same update; the step reads the skip flag on the host
(one sync per step; the fine-tuning loop reads its loss every step anyway).
"""
from __future__ import annotations

import statistics

import torch

from ._common import GuardedOptimizer, by_device_dtype, check_beta, check_nonneg, check_pos, params_with_grad

# s * width = 1e-2 at width 128 (see the module docstring)
WIDTH_SCALE = 1.28


def infer_width(params) -> int:
    """The median over parameters with two or more dimensions of their largest dimension (the
    hidden size of a transformer, with or without LoRA); with only vectors, the longest one.
    ValueError when no parameter holds an element."""
    params = list(params)
    mats = [max(p.shape) for p in params if p.dim() >= 2]
    if mats:
        return int(statistics.median_low(mats))
    longest = max((p.numel() for p in params), default=0)
    if longest == 0:
        raise ValueError("WidthScheduleFree: no non-empty parameter to read the width from; "
                         "pass width= (the model's hidden size)")
    return longest


class WidthScheduleFree(GuardedOptimizer):
    """Schedule-Free AdamW with the step size ``width_scale / width`` and no learning rate
    (see the module docstring for the update and the rule).

    Call ``opt.train()`` before training steps and ``opt.eval()`` before evaluating or saving the
    model (:func:`llmopt_ext.optim.driver.set_mode` does, and so does every loop of this
    project); the optimizer starts in training mode.

    Args:
        params: parameters or parameter groups (groups may differ in ``betas``, ``eps``,
            ``weight_decay``; the step size is shared).
        betas: (b1, b2): b1 interpolates ``y`` between ``z`` and ``x`` (0.9), b2 is Adam's
            second-moment decay (0.999).
        eps, weight_decay: Adam's epsilon; decoupled weight decay taken at ``y``.
        warmup_steps: linear warm-up of the step size (the CLI uses 3% of the run).
        width: the model's width; by default read off the parameters (:func:`infer_width`).
        width_scale: the step size times the width (1.28).
    """

    _name = "WidthScheduleFree"

    # driving contract (llmopt_ext.optim.driver)
    step_kind = "backward"
    lr_free = True
    lr_schedulable = False   # schedule-free by design; its only schedule is the warm-up
    default_lr = None

    def __init__(self, params, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, warmup_steps: int = 0, width: int | None = None,
                 width_scale: float = WIDTH_SCALE):
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps} (expected an integer >= 0)")
        check_pos("width_scale", width_scale)
        super().__init__(params, dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        if width is None:
            width = infer_width([p for g in self.param_groups for p in g["params"]])
        check_pos("width", width)
        self.width, self.width_scale = int(width), float(width_scale)
        self.warmup_steps = int(warmup_steps)
        # steps taken (skipped ones not counted) and sum of the squared step sizes: the state
        # of the averaging, kept in the state_dict
        self._t, self._weight_sum = 0, 0.0
        self._training = True

    def _check_group(self, group: dict) -> None:
        check_beta("beta1", group["betas"][0])
        check_beta("beta2", group["betas"][1])
        if group["betas"][0] == 0.0:
            raise ValueError("Invalid beta1: 0.0 (x = (y - (1 - b1) z) / b1 needs b1 > 0)")
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])

    @property
    def step_size(self) -> float:
        """s = width_scale / width (before warm-up and bias correction)."""
        return self.width_scale / self.width

    # ------------------------------------------------------------------ modes

    def _set_params(self, to_x: bool) -> None:
        with torch.no_grad():
            for group in self.param_groups:
                b1 = group["betas"][0]
                for p in group["params"]:
                    st = self.state.get(p)
                    if not st:
                        continue
                    y = st["y"]
                    v = torch.lerp(y, st["z"], 1.0 - 1.0 / b1) if to_x else y  # (y - (1-b1) z) / b1
                    p.copy_(v)

    def eval(self) -> None:
        """Put the averaged weights ``x`` into the parameters (to evaluate or save)."""
        if self._training:
            self._set_params(to_x=True)
            self._training = False

    def train(self) -> None:
        """Put the training weights ``y`` back into the parameters (bit-exact)."""
        if not self._training:
            self._set_params(to_x=False)
            self._training = True

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["schedule_free"] = {"t": self._t, "weight_sum": self._weight_sum,
                               "training": self._training, "width": self.width}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("schedule_free")
        if extra is None:
            raise ValueError("WidthScheduleFree.load_state_dict: no 'schedule_free' entry (a "
                             "state_dict of another optimizer)")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "schedule_free"})
        self._t, self._weight_sum = int(extra["t"]), float(extra["weight_sum"])
        self._training, self.width = bool(extra["training"]), int(extra["width"])

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        if not self._training:
            raise RuntimeError("WidthScheduleFree.step() in eval mode: call optimizer.train() "
                               "before training steps (the parameters hold the averaged x now)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            ps = params_with_grad(self._name, group)
            for idx in by_device_dtype(ps).values():
                gp = [ps[i] for i in idx]
                for p in gp:
                    st = self.state[p]
                    if not st:
                        st["y"] = p.detach().float().clone()
                        st["z"] = st["y"].clone()
                        st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                work.append((group, gp, [p.grad.float() for p in gp]))
        if not work:
            return loss
        flag = self._step_flag([g for w in work for g in w[2]], work[0][1][0].device)
        if bool(flag):   # non-finite gradient: nothing changes (counted by _step_flag)
            return loss
        t = self._t + 1
        a = self.step_size * (min(1.0, t / self.warmup_steps) if self.warmup_steps else 1.0)
        # the warm-up only grows a, so a is also the largest step size so far
        weight_sum = self._weight_sum + a * a
        c = a * a / weight_sum
        for group, ps, g32 in work:
            b1, b2 = group["betas"]
            y = [self.state[p]["y"] for p in ps]
            z = [self.state[p]["z"] for p in ps]
            v = [self.state[p]["exp_avg_sq"] for p in ps]
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g32, g32, value=1.0 - b2)
            den = torch._foreach_div(v, 1.0 - b2 ** t)
            torch._foreach_sqrt_(den)
            torch._foreach_add_(den, group["eps"])
            d = torch._foreach_div(g32, den)
            if group["weight_decay"]:
                torch._foreach_add_(d, y, alpha=group["weight_decay"])
            torch._foreach_lerp_(y, z, c)
            torch._foreach_add_(y, d, alpha=a * (b1 * (1.0 - c) - 1.0))
            torch._foreach_add_(z, d, alpha=-a)
            torch._foreach_copy_(ps, y)   # rounds y once into the parameter's dtype
        self._t, self._weight_sum = t, weight_sum
        return loss
