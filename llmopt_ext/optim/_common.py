"""Helpers shared by the curvature-aware optimizers: argument checks, grouping tensors for
the fused ops, GradScaler hand-off, and Hutchinson probes that are identical on every
DDP rank."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import torch
import torch.distributed as dist


def check_lr(lr: float) -> None:
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr} (expected a finite value >= 0)")


def check_beta(name: str, b: float) -> None:
    if not (0.0 <= b < 1.0):
        raise ValueError(f"Invalid {name}: {b} (expected a value in [0, 1))")


def check_nonneg(name: str, v: float) -> None:
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {name}: {v} (expected a finite value >= 0)")


def check_pos(name: str, v: float) -> None:
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"Invalid {name}: {v} (expected a finite value > 0)")


def params_with_grad(opt_name: str, group: dict) -> list[torch.Tensor]:
    out = []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{opt_name} does not support sparse gradients (parameter of shape "
                               f"{tuple(p.shape)}); use a dense embedding or torch.optim.SparseAdam")
        if torch.is_complex(p):
            raise RuntimeError(f"{opt_name} does not support complex parameters")
        out.append(p)
    return out


def by_device_dtype(params: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of params grouped by (device, dtype): one fused call per group."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    return groups


def amp_tensors(opt, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad_scale / found_inf set by torch.amp.GradScaler (optimizers with
    _step_supports_amp_scaling), moved to `device` without a host sync."""
    gs = getattr(opt, "grad_scale", None)
    fi = getattr(opt, "found_inf", None)
    if gs is not None:
        gs = gs.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)
    if fi is not None:
        fi = fi.to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)
    return gs, fi


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average a list of tensors across ranks with one all-reduce of a flat buffer."""
    if not distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def probe_seed(seed: int, step: int, sample: int) -> int:
    """Seed of the Hutchinson probe of (step, sample): the same on every rank, different
    per step, no communication."""
    return (seed * 1_000_003 + step * 1_009 + sample) % (2**63 - 1)


def hutchinson_diag(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    seed: int,
    n_samples: int = 1,
    distribution: str = "rademacher",
    retain_graph: bool = False,
) -> list[torch.Tensor]:
    """Hutchinson estimate of diag(H): mean over probes z of z * (H z), in float32.

    `grads` must carry a graph (``loss.backward(create_graph=True)`` or
    ``torch.autograd.grad(..., create_graph=True)``). Probe k of a call is drawn from a
    generator seeded with ``probe_seed(seed, ..)``-style seeds chosen by the caller, so every
    DDP rank draws the same z; the estimates are then averaged across ranks (each rank's
    H z is the Hessian of its own micro-batch loss), which keeps ranks identical.
    """
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"unknown probe distribution {distribution!r} (rademacher or gaussian)")
    for i, g in enumerate(grads):
        if g.grad_fn is None:
            raise RuntimeError(
                f"gradient {i} has no graph: call loss.backward(create_graph=True) before step() "
                "so the Hessian-vector product can be taken")
    est = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for k in range(n_samples):
        zs = []
        gens: dict[torch.device, torch.Generator] = {}
        for p in params:
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device).manual_seed(seed + k)
            gen = gens[p.device]
            if distribution == "rademacher":
                z = torch.randint(0, 2, p.shape, generator=gen, device=p.device, dtype=p.dtype) * 2 - 1
            else:
                z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
            zs.append(z)
        hzs = torch.autograd.grad(list(grads), list(params), grad_outputs=zs,
                                  retain_graph=retain_graph or k < n_samples - 1)
        for e, z, hz in zip(est, zs, hzs):
            e.addcmul_(z.float(), hz.float(), value=1.0 / n_samples)
    all_reduce_mean_(est)
    return est


def as_float_list(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]
