"""``transformers.Trainer`` with every :mod:`llmopt_ext.optim` optimizer.

The Trainer's loop is ``loss = training_step(...)`` (forward + backward), then clipping, then
``optimizer.step()``. That fits AdamW-like optimizers (``GoLoreAdamW``, ``SophiaG``) but not:

* Hutchinson optimizers (``AdaHessian``, ``SophiaH``): the backward must keep the graph
  (``create_graph=True``) so the optimizer can take Hessian-vector products;
* closure optimizers (``TRCG``, ``AISARAH``: the closure returns the loss and is re-evaluated at
  trial points; ``OASIS``: the closure also runs the create_graph backward): the step must run
  inside ``training_step`` where the batch is known.

:class:`LlmoptTrainer` handles both. Usage::

    from llmopt_ext.optim import TRCG
    from llmopt_ext.finetune.hf import LlmoptTrainer
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager"), cfg)
    opt = TRCG([p for p in model.parameters() if p.requires_grad], preconditioner="abs_grad_ema")
    trainer = LlmoptTrainer(model=model, args=TrainingArguments(..., max_grad_norm=0),
                            train_dataset=ds, data_collator=collator, optimizers=(opt, None))
    trainer.train()

Rules it enforces: pass the optimizer instance through ``optimizers=(opt, None)``; gradient
clipping is switched off for the second-order optimizers (it would distort the curvature
pairs; a warning says so); closure optimizers need ``gradient_accumulation_steps=1`` (the
closure is one batch); use ``attn_implementation="eager"`` (SDPA kernels have no double
backward). SophiaG's GNB Hessian refresh runs every ``sophiag_hessian_every`` optimizer steps
(default 10) on the current batch. ``TRCG``/``AISARAH`` have no learning rate: their param
groups get an ``lr`` of 0 so the Trainer's scheduler and logs work (the optimizers ignore it).
Single process (DDP for these optimizers: use ``llmopt-finetune`` under torchrun).
"""
from __future__ import annotations

import warnings

import torch
from transformers import Trainer

from .. import optim as O

_GRAPH = (O.AdaHessian, O.SophiaH)
_CLOSURE_LOSS = (O.TRCG, O.AISARAH)  # closure returns the loss, no backward


def optimizer_kind(opt) -> str:
    """'plain', 'sophiag', 'graph' (create_graph backward), 'closure' or 'oasis'."""
    if isinstance(opt, O.SophiaG):
        return "sophiag"
    if isinstance(opt, _GRAPH):
        return "graph"
    if isinstance(opt, _CLOSURE_LOSS):
        return "closure"
    if isinstance(opt, O.OASIS):
        return "oasis"
    return "plain"


class LlmoptTrainer(Trainer):
    """``Trainer`` whose ``training_step`` drives llmopt_ext's second-order optimizers (module doc)."""

    def __init__(self, *args, sophiag_hessian_every: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        opt = self.optimizer
        self._llmopt_opt = opt
        self._llmopt_kind = optimizer_kind(opt) if opt is not None else "plain"
        self._sophiag_every = sophiag_hessian_every
        self._sophiag_last = -1
        kind = self._llmopt_kind
        if kind in ("graph", "closure", "oasis") and self.args.max_grad_norm:
            warnings.warn(f"LlmoptTrainer: gradient clipping disabled for {type(opt).__name__} "
                          f"(max_grad_norm {self.args.max_grad_norm} -> 0)")
            self.args.max_grad_norm = 0.0
        if kind in ("closure", "oasis"):
            if self.args.gradient_accumulation_steps != 1:
                raise ValueError(f"{type(opt).__name__} steps with a closure over one batch: "
                                 "use gradient_accumulation_steps=1 (raise the batch size instead)")
            for g in opt.param_groups:
                g.setdefault("lr", 0.0)
            # the real step runs in training_step; the Trainer's own optimizer.step() is a no-op
            self._llmopt_step = type(opt).step.__get__(opt)
            opt.step = lambda *a, **k: None

    def _loss(self, model, inputs) -> torch.Tensor:
        with self.compute_loss_context_manager():
            return self.compute_loss(model, inputs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        kind, opt = self._llmopt_kind, self._llmopt_opt
        if kind == "plain":
            return super().training_step(model, inputs, num_items_in_batch)
        inputs = self._prepare_inputs(inputs)
        if kind == "sophiag":
            step = self.state.global_step
            if step > 0 and step % self._sophiag_every == 0 and self._sophiag_last != step:
                # grads were zeroed after the last step: refresh before this step's backward
                self._sophiag_last = step
                model.train()
                fwd = {k: v for k, v in inputs.items() if k != "labels"}
                with self.compute_loss_context_manager():
                    logits = model(**fwd).logits
                mask = inputs["labels"] == -100 if "labels" in inputs else None
                opt.update_hessian_from_logits(logits, ignore_mask=mask)
            return super().training_step(model, inputs, num_items_in_batch)
        if kind == "graph":
            model.train()
            graph = True
            if isinstance(opt, O.SophiaH):
                graph = opt.param_groups[0].get("step_count", 0) % opt.update_period == 0
            loss = self._loss(model, inputs) / self.current_gradient_accumulation_steps
            loss.backward(create_graph=graph)
            return loss.detach()
        if kind == "closure":
            model.eval()  # the closure is re-evaluated at the trial point: no dropout
            loss = self._llmopt_step(lambda: self._loss(model, inputs))
            return loss.detach()
        # OASIS: the closure runs its own create_graph backward, at w_k and (same-batch gradient
        # difference, the default) at w_{k-1}: it must be deterministic, so no dropout

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = self._loss(model, inputs)
            loss.backward(create_graph=True)
            return loss
        model.eval()
        loss = self._llmopt_step(closure)
        opt.zero_grad(set_to_none=True)  # drop the graph held by .grad
        return loss.detach()
