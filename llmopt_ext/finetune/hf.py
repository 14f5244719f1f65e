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

How each optimizer is driven is its own declaration (:mod:`llmopt_ext.optim.driver`): the
trainer reads the contract, never the optimizer's type, so any ``torch.optim.Optimizer``
(AdamW, Prodigy, ...) works, driven like AdamW.

Rules it enforces: pass the optimizer instance through ``optimizers=(opt, None)``; gradient
clipping is switched off for optimizers that do not accept it (it would distort the curvature
pairs; a warning says so); closure optimizers need ``gradient_accumulation_steps=1`` (the
closure is one batch); use ``attn_implementation="eager"`` (SDPA kernels have no double
backward). An optimizer's ``step_kwargs`` / ``after_step`` get a ``StepContext`` of the
current batch (SophiaG: its token count, and its GNB Hessian refresh every ``update_period``
steps). Learning-rate-free optimizers without an ``lr`` entry (``TRCG``, ``AISARAH``,
``WidthScheduleFree``) get an ``lr`` of 0 in their param groups so the Trainer's scheduler and
logs work (the optimizers ignore it; HyperAdamW's ``lr`` is its schedule factor and is kept).
Single process (DDP for these optimizers: use ``llmopt-finetune`` under torchrun).
"""
from __future__ import annotations

import warnings

import torch
from transformers import Trainer

from ..optim import driver


class LlmoptTrainer(Trainer):
    """``Trainer`` whose ``training_step`` drives any optimizer by its contract (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opt = self.optimizer
        self._llmopt_opt = opt
        self._llmopt_ctx = driver.StepContext()
        if opt is None:
            return
        if self.args.max_grad_norm and not driver.accepts_grad_clipping(opt):
            warnings.warn(f"LlmoptTrainer: gradient clipping disabled for {type(opt).__name__} "
                          f"(max_grad_norm {self.args.max_grad_norm} -> 0)")
            self.args.max_grad_norm = 0.0
        if driver.lr_free(opt):  # the Trainer's scheduler and logs read group["lr"]
            for g in opt.param_groups:
                g.setdefault("lr", 0.0)
        step = type(opt).step.__get__(opt)
        if driver.is_closure_driven(opt):
            if self.args.gradient_accumulation_steps != 1:
                raise ValueError(f"{type(opt).__name__} steps with a closure over one batch: "
                                 "use gradient_accumulation_steps=1 (raise the batch size instead)")
            # the real step (with a closure) runs in training_step; the Trainer's own
            # optimizer.step() (no closure) is a no-op
            opt.step = lambda closure=None, **k: None if closure is None else step(closure, **k)
        else:
            # the Trainer calls optimizer.step() after clipping: add the step's context and
            # the optimizer's after_step hook, and free a graph kept by the backward
            def step_with_context(*a, **k):
                out = step(*a, **{**driver.step_kwargs(opt, self._llmopt_ctx), **k})
                if self._llmopt_graph:
                    opt.zero_grad(set_to_none=True)
                driver.after_step(opt, self._llmopt_ctx)
                self._llmopt_ctx = driver.StepContext()
                return out
            opt.step = step_with_context
        self._llmopt_graph = False

    def _loss(self, model, inputs) -> torch.Tensor:
        with self.compute_loss_context_manager():
            return self.compute_loss(model, inputs)

    def _context(self, model, inputs) -> driver.StepContext:
        """The current micro-batch's tokens (accumulated over the step) and logits."""
        labels = inputs.get("labels")
        n = self._llmopt_ctx.n_tokens or 0
        if labels is not None:
            n += int((labels != -100).sum())

        def logits():
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            with self.compute_loss_context_manager():
                out = model(**fwd).logits
            return out, (labels == -100 if labels is not None else None)
        return driver.StepContext(n_tokens=n or None, logits=logits)

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = self._llmopt_opt
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        inputs = self._prepare_inputs(inputs)
        self._llmopt_ctx = self._context(model, inputs)
        if driver.is_closure_driven(opt):
            # the closure is re-evaluated at other weights: no dropout when it must be deterministic
            model.train(not driver.deterministic_closure(opt))
            return driver.drive_step(opt, lambda: self._loss(model, inputs), ctx=self._llmopt_ctx)
        self._llmopt_graph = driver.needs_graph(opt)
        if not self._llmopt_graph:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        loss = self._loss(model, inputs) / self.current_gradient_accumulation_steps
        loss.backward(create_graph=True)
        return loss.detach()
