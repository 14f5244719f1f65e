"""The optimizers ``llmopt-finetune --optimizer NAME`` can build, and their learning-rate schedule.

This is the one place that knows optimizer names: each entry turns the CLI's options into a
constructor call. How an optimizer is *driven* (backward with or without graph, closure, GradScaler,
clipping, DDP wrapping) is declared by the optimizer class itself and read through
:mod:`llmopt_ext.optim.driver`; nothing else in the CLI looks at the name.

Default learning rates come from each class's ``default_lr``. AdamW / GoLore: 2e-3.
``bench/bench_finetune.py``'s sweep on the embedded task (300 steps, cosine): eval loss 1.07 /
0.707 / 0.371 / 0.355 at 5e-4 / 1e-3 / 2e-3 / 5e-3, so 2e-3 is within 5% of the best and a step
below the largest rate tried. The others are their papers' / official code's defaults, except
SophiaG's (see its class).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..optim import driver


class UsageError(ValueError):
    """A bad combination of options: the message says what to change."""


@dataclass(frozen=True)
class Entry:
    cls: Callable[[], type]     # the class (imported lazily: peer packages are optional)
    build: Callable             # (cls, params, lr, opts, total_steps) -> optimizer
    default_lr: float | None = None  # for classes that carry no default_lr (torch's, peers')
    schedule: bool | None = None     # None: the class's contract decides (driver.lr_schedulable)


def _entries() -> dict[str, Entry]:
    from .. import optim as O
    return {
        "adamw": Entry(lambda: torch.optim.AdamW,
                       lambda c, p, lr, o, t: c(p, lr=lr, weight_decay=o.weight_decay), 2e-3),
        # no learning rate: AdamW's direction, the step size learned by its hypergradient
        "hyperadamw": Entry(lambda: O.HyperAdamW,
                            lambda c, p, lr, o, t: c(p, weight_decay=o.weight_decay)),
        # no learning rate: Schedule-Free AdamW with the step size 1.28 / model width
        "sf-width": Entry(lambda: O.WidthScheduleFree, lambda c, p, lr, o, t: c(
            p, weight_decay=o.weight_decay, warmup_steps=max(1, int(0.03 * t)))),
        # GoLore on the LoRA matrices, rank r/2 so both A (r x in) and B (out x r) are projected
        "golore": Entry(lambda: O.GoLoreAdamW, lambda c, p, lr, o, t: c(
            p, lr=lr, weight_decay=o.weight_decay, rank=max(1, o.lora_r // 2),
            update_proj_gap=50, total_steps=t, seed=o.seed)),
        # GNB labels seeded with seed + 17 (the stream this CLI has always used)
        "sophiag": Entry(lambda: O.SophiaG, lambda c, p, lr, o, t: c(
            p, lr=lr, weight_decay=o.weight_decay, bs=1, update_period=o.hessian_every,
            seed=o.seed + 17)),
        "sophiah": Entry(lambda: O.SophiaH, lambda c, p, lr, o, t: c(
            p, lr=lr, weight_decay=o.weight_decay, update_period=o.hessian_every, seed=o.seed)),
        "adahessian": Entry(lambda: O.AdaHessian, lambda c, p, lr, o, t: c(
            p, lr=lr, weight_decay=o.weight_decay, seed=o.seed)),
        "oasis": Entry(lambda: O.OASIS, lambda c, p, lr, o, t: c(p, lr=lr, seed=o.seed)),
        "aisarah": Entry(lambda: O.AISARAH, lambda c, p, lr, o, t: c(p)),
        "trcg": Entry(lambda: O.TRCG, lambda c, p, lr, o, t: c(
            p, preconditioner="abs_grad_ema", max_cg_iters=o.cg_iters)),
        # the tuning-free optimizers users pick instead (optional packages, benchmark
        # baselines), at their packages' recommended settings; driven like AdamW
        "schedulefree": Entry(lambda: _peer("schedulefree", "AdamWScheduleFree"),
                              lambda c, p, lr, o, t: c(p, lr=lr, weight_decay=o.weight_decay,
                                                       warmup_steps=max(1, int(0.03 * t))),
                              0.0025, schedule=False),  # schedule-free: no schedule by design
        "prodigy": Entry(lambda: _peer("prodigyopt", "Prodigy"),
                         lambda c, p, lr, o, t: c(p, lr=lr, weight_decay=o.weight_decay), 1.0,
                         schedule=False),
        "dadapt_adam": Entry(lambda: _peer("dadaptation", "DAdaptAdam"),
                             lambda c, p, lr, o, t: c(p, lr=lr, weight_decay=o.weight_decay), 1.0,
                             schedule=False),
    }


def _peer(module: str, cls: str) -> type:
    import importlib
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        pip = {"prodigyopt": "prodigyopt", "dadaptation": "dadaptation"}.get(module, module)
        raise UsageError(f"this optimizer needs the {module} package: pip install {pip}") from None


OPTIMIZERS = tuple(_entries())


def optimizer_class(name: str) -> type:
    entries = _entries()
    if name not in entries:
        raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(entries)}")
    return entries[name].cls()


def check_optimizer_options(opts) -> None:
    """What the chosen optimizer's contract rules out, said before anything loads."""
    cls = optimizer_class(opts.optimizer)
    if opts.lr is not None and driver.lr_free(cls):
        raise UsageError(f"--lr: {opts.optimizer} has no learning rate (it is tuning-free)")
    if opts.precision == "fp16" and not driver.supports_grad_scaler(cls):
        ok = [n for n in OPTIMIZERS if driver.supports_grad_scaler(optimizer_class(n))]
        raise UsageError(f"--precision fp16 needs a GradScaler, which {opts.optimizer} does not "
                         f"support here (supported: {', '.join(ok)}); use bf16 or fp32")


def build_optimizer(name: str, params: list, opts, total_steps: int):
    cls, entry = optimizer_class(name), _entries()[name]
    lr = opts.lr
    if lr is None:
        lr = entry.default_lr if entry.default_lr is not None else driver.default_lr(cls)
    return entry.build(cls, params, lr, opts, total_steps)


def make_scheduler(opt, opts):
    """Linear warmup over 3% of the steps, then cosine decay to 0 (``--lr-schedule cosine``,
    the default) or constant, for the optimizers whose step a learning rate scales. On the
    embedded task with AdamW at 2e-3, 600 steps: the constant rate plateaus from step ~300 at
    train loss ~0.35 (eval loss 0.3082, exact match 0.750); cosine: eval loss 0.3078, exact
    match 0.765."""
    entry = _entries().get(opts.optimizer)
    scheduled = entry.schedule if entry is not None and entry.schedule is not None \
        else driver.lr_schedulable(opt)
    if opts.lr_schedule == "constant" or not scheduled:
        return None
    total, warm = opts.max_steps, max(1, int(0.03 * opts.max_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
