"""Hessian-vector products for Hessian-free optimizers.

Two ways to get ``H v`` for the loss of a closure at the current parameters:

* double backward (``DoubleBackwardHVP``): the gradient is computed once with
  ``create_graph=True`` and every product is one more backward pass through that graph,
  ``H v = d(g . v)/dw``. It works with any closure and reuses the forward pass; measured on
  the tiny Llama + LoRA of bench/bench_trcg.py (CPU, 2 threads) it is the faster of the two,
  so it is TRCG's default.
* forward-over-reverse (``ForwardOverReverseHVP``): ``torch.func.jvp`` of ``torch.func.grad``
  through ``torch.func.functional_call`` on the module that owns the parameters. Each product
  re-runs the forward and backward pass (so the closure must be deterministic: no dropout),
  but it keeps no second-order graph between products, which can matter for memory on GPU.

Attention: PyTorch's fused SDPA kernels (flash / memory-efficient, and the CPU flash kernel
``_scaled_dot_product_flash_attention_for_cpu``) have neither a double backward nor
forward-mode AD. :func:`math_sdpa` selects the math backend, which has both; TRCG enters it
around every pass that an HVP differentiates through.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch

TensorList = Sequence[torch.Tensor]

_SDPA_HINT = (
    "The fused scaled_dot_product_attention kernels (flash / memory-efficient) have no double "
    "backward nor forward-mode AD. Run the HVP passes with the math backend: keep TRCG(..., "
    "sdpa_math=True) (the default), or wrap your closure in "
    "torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), or load the model "
    "with attn_implementation='eager'."
)


@contextlib.contextmanager
def math_sdpa(enabled: bool = True) -> Iterator[None]:
    """Restricts scaled_dot_product_attention to the math backend inside the block."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415 - optional, torch>=2.3

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _explain(exc: BaseException) -> BaseException:
    text = str(exc)
    if "scaled_dot_product" in text or "_efficient_attention" in text or "flash" in text:
        return RuntimeError(f"{text}\n\nllmopt_ext: {_SDPA_HINT}")
    return exc


def _materialize(outs, params: TensorList) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if o is None else o for o, p in zip(outs, params)]


class DoubleBackwardHVP:
    """``H v`` by a backward pass through the gradient's graph (created with create_graph)."""

    name = "double_backward"

    def __init__(self, loss: torch.Tensor, params: TensorList):
        self.params = list(params)
        try:
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        except RuntimeError as exc:
            raise _explain(exc) from exc
        self.grads = _materialize(grads, self.params)
        # parameters the loss does not depend on have a constant zero gradient (no graph)
        self._live = [i for i, g in enumerate(self.grads) if g.requires_grad]

    def __call__(self, vs: TensorList) -> list[torch.Tensor]:
        if not self._live:
            return [torch.zeros_like(p) for p in self.params]
        live_g = [self.grads[i] for i in self._live]
        live_v = [vs[i].to(self.grads[i].dtype) for i in self._live]
        try:
            hv = torch.autograd.grad(live_g, self.params, grad_outputs=live_v, retain_graph=True,
                                     allow_unused=True)
        except RuntimeError as exc:
            raise _explain(exc) from exc
        return _materialize(hv, self.params)

    def release(self) -> None:
        self.grads = []


class _ClosureModule(torch.nn.Module):
    """Lets torch.func.functional_call swap the parameters of `model` while `closure` runs."""

    def __init__(self, model: torch.nn.Module, closure: Callable[[], torch.Tensor]):
        super().__init__()
        self.model = model
        self._closure = closure

    def forward(self) -> torch.Tensor:
        return self._closure()


class ForwardOverReverseHVP:
    """``H v`` as the forward-mode derivative (jvp) of the reverse-mode gradient.

    Needs the ``torch.nn.Module`` that owns the parameters; the closure must call that module
    (``torch.func.functional_call`` substitutes the parameters while it runs).
    """

    name = "forward_over_reverse"

    def __init__(self, loss: torch.Tensor, params: TensorList, model: torch.nn.Module,
                 closure: Callable[[], torch.Tensor]):
        self.params = list(params)
        try:
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        except RuntimeError as exc:
            raise _explain(exc) from exc
        self.grads = _materialize(grads, self.params)
        by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        missing = [i for i, p in enumerate(self.params) if id(p) not in by_id]
        if missing:
            raise ValueError(f"forward_over_reverse: parameter {missing[0]} of the optimizer is not a "
                             "parameter of the model given as TRCG(..., model=)")
        self._names = ["model." + by_id[id(p)] for p in self.params]
        wrapper = _ClosureModule(model, closure)
        names = self._names

        def loss_of(*ps):
            return torch.func.functional_call(wrapper, dict(zip(names, ps)), (), strict=False)

        self._grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(self.params))))

    def __call__(self, vs: TensorList) -> list[torch.Tensor]:
        primals = tuple(p.detach() for p in self.params)
        tangents = tuple(v.to(p.dtype) for v, p in zip(vs, self.params))
        try:
            _, hv = torch.func.jvp(self._grad_fn, primals, tangents)
        except RuntimeError as exc:
            raise _explain(exc) from exc
        return list(hv)

    def release(self) -> None:
        self.grads = []


def hvp_reference(loss_fn: Callable[[], torch.Tensor], params: TensorList, vs: TensorList) -> list[torch.Tensor]:
    """Plain double-backward HVP, for tests: H v of loss_fn() at the current params."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    return list(torch.autograd.grad(grads, list(params), grad_outputs=list(vs)))
