"""One contract for how an optimizer is driven, and one driver that follows it.

An optimizer step is not always "backward, then ``step()``": a Hutchinson method needs the
backward to keep its graph, a trust-region method re-evaluates a closure at a trial point, and
OASIS runs its own backward inside the closure. Each optimizer class says which it is, so the
fine-tuning CLI, :class:`~llmopt_ext.finetune.hf.LlmoptTrainer`, the benchmarks and the tests
drive every optimizer through :func:`drive_step` with no per-optimizer code. Adding an optimizer
means writing its class only.

The contract (class attributes and methods, every one optional; a plain
``torch.optim.Optimizer`` -- AdamW, Prodigy, Schedule-Free -- gets the defaults and is driven
like AdamW):

``step_kind``
    how a step is taken (see :class:`StepKind`); default ``"backward"``.
``needs_graph(self) -> bool``
    whether the backward before the coming step must keep its graph (``create_graph=True``).
    Answered by the optimizer from its own state (SophiaH: only on the steps that refresh its
    Hessian estimate). Default: ``True`` for ``backward_graph`` and ``closure_backward``.
``default_lr: float | None``
    learning rate a front end uses for LoRA fine-tuning when the user gives none.
``lr_free: bool``
    the optimizer has no learning rate; a front end must refuse one. Default ``False``.
``lr_schedulable: bool``
    a learning-rate schedule scales its step (OASIS: no, its lr is only the first step size).
    Default ``not lr_free``.
``supports_grad_scaler: bool``
    may be stepped through ``torch.amp.GradScaler`` (fp16). Default: ``True`` for
    ``backward`` optimizers (the scaler unscales the gradients), else
    ``_step_supports_amp_scaling``.
``accepts_grad_clipping: bool``
    clipping the gradient norm before the step is meaningful (not for methods whose step is
    built from curvature pairs or their own clip). Default: ``True`` for ``backward``.
``uses_hvp: bool``
    takes Hessian-vector products: the model must support double backward (eager attention),
    and the optimizer averages gradients/HVPs across ranks itself (do not wrap in DDP).
``deterministic_closure: bool``
    re-evaluates its closure at other weights: the closure must be deterministic (model in
    eval mode, no dropout). Default: ``True`` for the closure kinds.
``step_kwargs(self, ctx) -> dict``
    extra keyword arguments for ``step()`` from a :class:`StepContext` (SophiaG: the token count
    ``bs``; AI-SARAH: the anchor ``full_closure``).
``after_step(self, ctx) -> None``
    work after the step (SophiaG: its Gauss-Newton-Bartlett Hessian refresh from ``ctx.logits``).
``train`` / ``eval`` methods
    optimizers that keep two sets of weights (Schedule-Free) switch them; :func:`set_mode`
    calls these around training and evaluation when an optimizer has them.
``skipped_steps: int``
    steps skipped for a non-finite loss, gradient or HVP (read with :func:`skipped_steps`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch


class StepKind(str, enum.Enum):
    BACKWARD = "backward"                   # loss.backward(); opt.step()
    BACKWARD_GRAPH = "backward_graph"       # loss.backward(create_graph=opt.needs_graph()); opt.step()
    CLOSURE_LOSS = "closure_loss"           # opt.step(closure): closure returns the loss, no backward
    CLOSURE_BACKWARD = "closure_backward"   # opt.step(closure): closure zeroes grads, backward, returns loss


_CLOSURE_KINDS = (StepKind.CLOSURE_LOSS, StepKind.CLOSURE_BACKWARD)
_GRAPH_KINDS = (StepKind.BACKWARD_GRAPH, StepKind.CLOSURE_BACKWARD)


@dataclass
class StepContext:
    """What a step may need beyond the loss. All optional.

    n_tokens: tokens that count in the loss over the step's micro-batches (SophiaG's ``bs``).
    logits: returns ``(logits, ignore_mask)`` of one batch, forward under the caller's autocast
        (SophiaG's GNB refresh); ``ignore_mask`` is True where a token does not count.
    full_loss: AI-SARAH's anchor: returns the loss, or yields per-chunk losses, of a fixed sample.
    """

    n_tokens: int | None = None
    logits: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    full_loss: Callable[[], object] | None = None


# ---------------------------------------------------------------------------- the contract

def step_kind(opt_or_cls) -> StepKind:
    return StepKind(getattr(opt_or_cls, "step_kind", StepKind.BACKWARD))


def _attr(opt_or_cls, name: str, default):
    v = getattr(opt_or_cls, name, None)
    return default if v is None else v


def needs_graph(opt) -> bool:
    fn = getattr(opt, "needs_graph", None)
    return bool(fn()) if callable(fn) else step_kind(opt) in _GRAPH_KINDS


def lr_free(opt_or_cls) -> bool:
    return bool(_attr(opt_or_cls, "lr_free", False))


def default_lr(opt_or_cls) -> float | None:
    return getattr(opt_or_cls, "default_lr", None)


def lr_schedulable(opt_or_cls) -> bool:
    return bool(_attr(opt_or_cls, "lr_schedulable", not lr_free(opt_or_cls)))


def supports_grad_scaler(opt_or_cls) -> bool:
    plain = step_kind(opt_or_cls) == StepKind.BACKWARD
    return bool(_attr(opt_or_cls, "supports_grad_scaler",
                      plain or getattr(opt_or_cls, "_step_supports_amp_scaling", False)))


def accepts_grad_clipping(opt_or_cls) -> bool:
    return bool(_attr(opt_or_cls, "accepts_grad_clipping",
                      step_kind(opt_or_cls) == StepKind.BACKWARD))


def uses_hvp(opt_or_cls) -> bool:
    return bool(_attr(opt_or_cls, "uses_hvp", False))


def deterministic_closure(opt_or_cls) -> bool:
    return bool(_attr(opt_or_cls, "deterministic_closure", step_kind(opt_or_cls) in _CLOSURE_KINDS))


def is_closure_driven(opt_or_cls) -> bool:
    return step_kind(opt_or_cls) in _CLOSURE_KINDS


def skipped_steps(opt) -> int:
    """Steps the optimizer skipped because the loss, a gradient or a Hessian-vector product
    was NaN/Inf (parameters and state left unchanged); 0 for optimizers that do not count.
    Reading it may cost one host sync (the count is kept on the device)."""
    return int(getattr(opt, "skipped_steps", 0) or 0)


def step_kwargs(opt, ctx: StepContext | None) -> dict:
    fn = getattr(opt, "step_kwargs", None)
    return dict(fn(ctx or StepContext())) if callable(fn) else {}


def after_step(opt, ctx: StepContext | None) -> None:
    fn = getattr(opt, "after_step", None)
    if callable(fn):
        fn(ctx or StepContext())


def set_mode(opt, training: bool) -> None:
    """``opt.train()`` before training steps, ``opt.eval()`` before evaluating or saving, for
    optimizers whose weights differ between the two (Schedule-Free); a no-op for the others."""
    fn = getattr(opt, "train" if training else "eval", None)
    if callable(fn):
        fn()


# ---------------------------------------------------------------------------- the driver

def backward(opt, loss: torch.Tensor, scaler=None) -> None:
    """``loss.backward()`` as the optimizer's coming step needs it (graph kept or not),
    scaled by ``scaler`` when given."""
    (scaler.scale(loss) if scaler is not None else loss).backward(create_graph=needs_graph(opt))


def finish_step(opt, ctx: StepContext | None = None, *, scaler=None, max_grad_norm: float = 0.0,
                graph: bool = False):
    """The part of a backward-kind step after the gradients exist: clipping (when the optimizer
    accepts it), ``step`` (through ``scaler`` when given), dropping a graph held by ``.grad``,
    and the optimizer's ``after_step`` hook."""
    kw = step_kwargs(opt, ctx)
    if max_grad_norm > 0 and accepts_grad_clipping(opt):
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(_params(opt), max_grad_norm)
    if scaler is not None:
        scaler.step(opt, **kw)
        scaler.update()
    else:
        opt.step(**kw)
    if graph:  # .grad holds the graph: free it before the next forward
        opt.zero_grad(set_to_none=True)
    after_step(opt, ctx)


def drive_step(opt, loss_fns: Sequence[Callable[[], torch.Tensor]] | Callable[[], torch.Tensor], *,
               scaler=None, max_grad_norm: float = 0.0, ctx: StepContext | None = None) -> torch.Tensor:
    """One optimizer step over the micro-batches whose mean losses ``loss_fns`` compute
    (forward only; the driver does every backward). Returns the step's loss (the mean over the
    micro-batches, detached), whatever the optimizer's kind.

    ``scaler``: a ``torch.amp.GradScaler`` (fp16), only for optimizers that support one.
    ``max_grad_norm``: clip before the step, for optimizers that accept clipping (0: off).
    """
    fns = [loss_fns] if callable(loss_fns) else list(loss_fns)
    if not fns:
        raise ValueError("drive_step: no micro-batch loss functions given")
    if scaler is not None and not supports_grad_scaler(opt):
        raise ValueError(f"{type(opt).__name__} cannot be stepped through a GradScaler "
                         "(use bf16 or fp32 instead of fp16)")
    set_mode(opt, True)  # a step is taken on the training weights (Schedule-Free)
    n, kind = len(fns), step_kind(opt)
    if kind == StepKind.CLOSURE_LOSS:
        loss = opt.step(lambda: sum(f() for f in fns) / n, **step_kwargs(opt, ctx))
        after_step(opt, ctx)
        return _detached(loss)
    if kind == StepKind.CLOSURE_BACKWARD:
        graph = needs_graph(opt)

        def closure():
            opt.zero_grad(set_to_none=True)
            total = sum(f() for f in fns) / n
            total.backward(create_graph=graph)
            return total
        loss = opt.step(closure, **step_kwargs(opt, ctx))
        if graph:
            opt.zero_grad(set_to_none=True)
        after_step(opt, ctx)
        return _detached(loss)
    graph = needs_graph(opt)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for f in fns:
        loss_t = f() / n
        (scaler.scale(loss_t) if scaler is not None else loss_t).backward(create_graph=graph)
        total += loss_t.detach()
    finish_step(opt, ctx, scaler=scaler, max_grad_norm=max_grad_norm, graph=graph)
    return _detached(total)


def _detached(loss) -> torch.Tensor:
    if torch.is_tensor(loss):
        return loss.detach()
    return torch.tensor(float(loss))


def _params(opt) -> Iterable[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]
