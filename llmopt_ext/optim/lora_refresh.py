"""ReLoRA-style subspace refresh for peft LoRA models (the LoRA flow of the GoLore seed).

A LoRA layer computes ``W0 x + s B A x``. With ``A`` (r x in) having orthonormal rows, the
gradient of ``B`` is ``s G A^T``: training ``B`` is GaLore/GoLore's right projection of the full
gradient ``G`` onto the row space of ``A``. A refresh therefore

1. merges the adapter into the base weight: ``W0 <- W0 + s B A`` (in float32, rounded once);
2. re-initialises ``A`` from a fresh projector: the top-r right singular vectors of the full
   gradient (``mode="svd"``, GaLore) or a Haar-random Stiefel matrix (``mode="random"``, GoLore),
   and sets ``B = 0``, so the model's function is unchanged;
3. rotates the optimizer state of ``B`` into the new coordinates (``moment_transfer="rotate"``;
   ``"reset"`` zeroes it) and resets the state of ``A`` (a new variable).

Rotation: ``B``'s first moment ``M_B`` is ``s M A_old^T`` for a full-space moment ``M`` in the row
space of ``A_old``, so ``M = M_B (A_old A_old^T)^-1 A_old / s`` and the moment of the new ``B`` is
``M_B C`` with ``C = (A_old A_old^T)^-1 A_old A_new^T`` (``A_old A_new^T`` when ``A_old`` has
orthonormal rows). The second moment gets ``C * C`` elementwise (exact for sign/permutation
changes, and non-negative).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..ops.stiefel import SEED_LIMIT, draw_seed, random_stiefel

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def _lora_layers(model: torch.nn.Module):
    try:
        from peft.tuners.lora import LoraLayer  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("relora_refresh needs peft (pip install peft)") from exc
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoraLayer)]


def lora_full_grads(model: torch.nn.Module, closure: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full gradients of the (frozen) base weights of every LoRA layer, for ``mode="svd"``.

    Temporarily enables ``requires_grad`` on the base weights, runs ``closure()`` (which must
    compute the loss and call ``backward()``), and returns ``{layer name: dL/dW0}`` with the
    base weight's shape (out x in). Gradients of other parameters accumulate as usual; zero them
    afterwards if this backward is not a training step.
    """
    layers = _lora_layers(model)
    weights = [(name, mod.get_base_layer().weight) for name, mod in layers]
    saved = [(w, w.requires_grad, w.grad) for _, w in weights]
    for _, w in weights:
        w.requires_grad_(True)
        w.grad = None
    try:
        closure()
        out = {}
        for (name, mod), (_, w) in zip(layers, weights):
            if w.grad is None:
                continue
            g = w.grad.detach().float()
            out[name] = g.mT if getattr(mod, "fan_in_fan_out", False) else g
        return out
    finally:
        for w, req, grad in saved:
            w.grad = grad
            w.requires_grad_(req)


@torch.no_grad()
def relora_refresh(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    mode: str = "random",
    full_grads: Mapping[str, torch.Tensor] | None = None,
    seed: int | None = None,
    offset: int = 0,
    moment_transfer: str = "rotate",
    adapter_name: str | None = None,
) -> int:
    """Merge every LoRA adapter into its base weight and restart it in a fresh subspace.

    Args:
        model: a peft model (or any module containing peft ``LoraLayer`` modules).
        optimizer: its optimizer (Adam-family state ``exp_avg``/``exp_avg_sq``), or None.
        mode: ``"random"`` (GoLore: ``A`` = transpose of a Haar-random in x r Stiefel matrix,
            from :func:`llmopt_ext.ops.random_stiefel`) or ``"svd"`` (GaLore: top-r right
            singular vectors of ``full_grads[layer name]``, see :func:`lora_full_grads`).
        seed, offset: the random projector of the k-th LoRA layer (in ``named_modules`` order)
            is ``random_stiefel(in, r, seed=seed, offset=offset + k)``; pass a new ``offset``
            (e.g. the refresh count times the layer count) at each refresh. ``seed=None`` draws
            one from torch's global generator.
        moment_transfer: ``"rotate"`` or ``"reset"`` for ``B``'s optimizer state (``A``'s is reset).
        adapter_name: the adapter to refresh (default: the active adapters).

    Returns the number of adapters refreshed. The model's outputs are unchanged (up to the
    rounding of the merged base weight to its dtype).
    """
    if mode not in ("random", "svd"):
        raise ValueError(f"relora_refresh: mode must be 'random' or 'svd', got {mode!r}")
    if moment_transfer not in ("rotate", "reset"):
        raise ValueError(f"relora_refresh: moment_transfer must be 'rotate' or 'reset', got {moment_transfer!r}")
    if mode == "svd" and full_grads is None:
        raise ValueError("relora_refresh: mode='svd' needs full_grads (see lora_full_grads)")
    seed = draw_seed() if seed is None else int(seed) % SEED_LIMIT
    count = 0
    for k, (name, mod) in enumerate(_lora_layers(model)):
        adapters = [adapter_name] if adapter_name is not None else list(mod.active_adapters)
        for adapter in adapters:
            if adapter not in mod.lora_A:
                continue
            a_param, a_old, a_new = _merge_and_restart(
                name, mod, adapter, mode, full_grads, seed=seed, offset=offset + k)
            if optimizer is not None:
                _transfer_moments(optimizer, a_param, mod.lora_B[adapter].weight, a_old, a_new,
                                  moment_transfer)
            count += 1
    return count


def _merge_and_restart(name, mod, adapter, mode, full_grads, *, seed, offset):
    """Merge one adapter into the base weight, draw its new A, zero B; returns
    ``(A param, old A, new A)`` (float32 copies)."""
    if getattr(mod, "use_dora", {}).get(adapter, False):
        raise NotImplementedError(f"relora_refresh: {name} uses DoRA, which has no plain merge-and-restart")
    a_param, b_param = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
    if a_param.dim() != 2 or b_param.dim() != 2:
        raise NotImplementedError(f"relora_refresh: {name} is not a linear LoRA layer")
    s = float(mod.scaling[adapter])
    base = mod.get_base_layer().weight
    r, n_in = a_param.shape
    if mode == "svd":  # checked before anything is written
        if name not in full_grads:
            raise KeyError(f"relora_refresh: full_grads has no gradient for LoRA layer {name!r}")
        g = full_grads[name].float()
        if g.shape != (b_param.shape[0], n_in):
            raise ValueError(f"relora_refresh: full_grads[{name!r}] has shape {tuple(g.shape)}, "
                             f"expected {(b_param.shape[0], n_in)}")
        a_new = torch.linalg.svd(g, full_matrices=False)[2][:r]
    else:
        a_new = random_stiefel(n_in, r, seed=seed, offset=offset, device=a_param.device).mT
    # clone: .float() of a float32 tensor is the tensor itself, overwritten below
    a_old, b_old = a_param.detach().float().clone(), b_param.detach().float().clone()
    delta = s * (b_old @ a_old)  # out x in
    if getattr(mod, "fan_in_fan_out", False):
        delta = delta.mT
    base.copy_((base.float() + delta).to(base.dtype))
    a_new = a_new.to(a_param.device, torch.float32)
    a_param.copy_(a_new.to(a_param.dtype))
    b_param.zero_()
    return a_param, a_old, a_new


def _transfer_moments(optimizer, a_param, b_param, a_old, a_new, moment_transfer: str) -> None:
    """A's optimizer state is reset; B's moments are rotated into the new subspace or reset."""
    _reset_state(optimizer, a_param)
    st = optimizer.state.get(b_param)
    if not (st and all(k in st for k in MOMENT_KEYS)):
        return
    if moment_transfer == "reset":
        _reset_state(optimizer, b_param)
        return
    gram = a_old @ a_old.mT
    c = torch.linalg.solve(gram, a_old @ a_new.mT)  # r x r
    st["exp_avg"].copy_((st["exp_avg"].float() @ c).to(st["exp_avg"].dtype))
    st["exp_avg_sq"].copy_((st["exp_avg_sq"].float() @ (c * c)).to(st["exp_avg_sq"].dtype))


def _reset_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> None:
    st = optimizer.state.get(p)
    if not st:
        return
    for key in MOMENT_KEYS + ("max_exp_avg_sq",):
        if key in st and isinstance(st[key], torch.Tensor):
            st[key].zero_()
