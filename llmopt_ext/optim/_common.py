"""Helpers shared by the curvature-aware optimizers: argument checks, grouping tensors for
the fused ops, GradScaler hand-off, and Hutchinson probes that are identical on every
DDP rank."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist


def check_lr(lr: float) -> None:
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid lr (learning rate): {lr} (expected a finite value >= 0)")


def check_beta(name: str, b: float) -> None:
    if not (0.0 <= b < 1.0):
        raise ValueError(f"Invalid {name}: {b} (expected a value in [0, 1))")


def check_nonneg(name: str, v: float) -> None:
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {name}: {v} (expected a finite value >= 0)")


def check_pos(name: str, v: float) -> None:
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"Invalid {name}: {v} (expected a finite value > 0)")


def check_adam_group(group: dict) -> None:
    """The checks of the Adam-style hyper-parameters a group shares: lr, betas, eps, weight_decay."""
    check_lr(group["lr"])
    check_beta("beta1", group["betas"][0])
    check_beta("beta2", group["betas"][1])
    check_nonneg("eps", group["eps"])
    check_nonneg("weight_decay", group["weight_decay"])


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


# ---------------------------------------------------------------------------- non-finite steps

def nonfinite_flag(tensors: Iterable[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """One-element float32 tensor on ``device``: 1.0 when any element of ``tensors`` (None
    entries ignored) is NaN or Inf, else 0.0. Computed on the devices without a host sync: one
    fused ``_foreach_norm`` per device, reduced in float32 (L1 in float32 overflows only past
    3.4e38, so no finite bf16/fp16 gradient is flagged; a half-precision norm would overflow at
    6.5e4)."""
    by_dev: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        if t is not None and t.numel():
            by_dev[t.device].append(t.detach())
    flag = torch.zeros(1, dtype=torch.float32, device=device)
    for ts in by_dev.values():
        total = torch.stack(torch._foreach_norm(ts, 1, dtype=torch.float32)).sum()
        flag = flag.maximum((~torch.isfinite(total)).to(device=device, dtype=torch.float32,
                                                          non_blocking=True).reshape(1))
    return flag


def combine_flags(flag: torch.Tensor, found_inf: torch.Tensor | None) -> torch.Tensor:
    """``max(flag, found_inf)``: skip when either the optimizer or a GradScaler says so."""
    if found_inf is None:
        return flag
    return flag.maximum(found_inf.to(device=flag.device, dtype=torch.float32,
                                     non_blocking=True).reshape(1))


def keep_where(flag: torch.Tensor, olds: Sequence[torch.Tensor], news: Sequence[torch.Tensor]) -> None:
    """In place ``old <- old if flag else new`` for each pair, without a host sync (a skipped
    step leaves the state bit-unchanged; NaN in ``new`` does not leak through ``where``)."""
    skip = flag.reshape(()) != 0
    for old, new in zip(olds, news):
        old.copy_(torch.where(skip.to(old.device), old, new))


class SkipCounter:
    """Counts skipped (non-finite) steps on the device: ``add(flag)`` needs no host sync; the
    count is read (one sync) only by whoever asks for :attr:`value`."""

    def __init__(self) -> None:
        self._count: torch.Tensor | None = None
        self._host = 0

    def add(self, flag: torch.Tensor | bool) -> None:
        if isinstance(flag, bool):
            self._host += int(flag)
            return
        f = flag.reshape(()).to(torch.float32)
        self._count = f.clone() if self._count is None else self._count + f.to(self._count.device)

    @property
    def value(self) -> int:
        return self._host + (0 if self._count is None else int(self._count.item()))


# ---------------------------------------------------------------------------- checkpoints

def _saved_params(state_dict: dict) -> list:
    return [pid for g in state_dict["param_groups"] for pid in g["params"]]


def check_state_layout(opt_name: str, opt: torch.optim.Optimizer, state_dict: dict,
                       shaped_like_param: Callable[[str], bool] = lambda key: True) -> None:
    """Reject a state_dict saved for other parameter shapes before anything is loaded: every
    saved state tensor with ``shaped_like_param(key)`` and ``dim() > 0`` must have its
    parameter's shape (torch's loader checks only the number of parameters per group)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    saved_ids = _saved_params(state_dict)
    if len(saved_ids) != len(params):
        raise ValueError(f"{opt_name}.load_state_dict: the state_dict has {len(saved_ids)} parameters, "
                         f"the optimizer {len(params)}")
    for i, (pid, p) in enumerate(zip(saved_ids, params)):
        for key, v in state_dict["state"].get(pid, {}).items():
            if (isinstance(v, torch.Tensor) and v.dim() > 0 and shaped_like_param(key)
                    and v.shape != p.shape):
                raise ValueError(f"{opt_name}.load_state_dict: state {key!r} of parameter {i} has shape "
                                 f"{tuple(v.shape)}, the parameter {tuple(p.shape)} (a checkpoint of "
                                 "another model or parameter layout)")


def restore_saved_dtypes(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """After ``torch.optim.Optimizer.load_state_dict`` (which casts floating state to the
    parameter dtype: fp32 state of bf16 parameters would become bf16, and then the fused
    updates refuse it or the trajectory changes): put back the saved tensors in their saved
    dtype, on the parameter's device, copied (the caller's state_dict is not aliased)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(_saved_params(state_dict), params):
        saved = state_dict["state"].get(pid)
        if saved is None:
            continue
        st = opt.state[p]
        for key, v in saved.items():
            if isinstance(v, torch.Tensor):
                st[key] = v.detach().to(device=p.device, copy=True)
            elif isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
                st[key] = type(v)(t.detach().to(device=p.device, copy=True) for t in v)


class GuardedOptimizer(torch.optim.Optimizer):
    """Base of the curvature-aware optimizers: every parameter group is validated when it is
    added (constructor and ``add_param_group``, so a bad second group fails before any
    update), a state_dict of another parameter layout is refused at ``load_state_dict`` and the
    loaded state keeps its saved dtype (fp32 state of bf16/fp16 parameters stays fp32), and
    skipped non-finite steps are counted (:attr:`skipped_steps`)."""

    _name = "optimizer"

    def _check_group(self, group: dict) -> None:
        """Raise ValueError naming the bad hyper-parameter of `group` (defaults filled in)."""

    def _state_shaped_like_param(self, key: str) -> bool:
        """Whether state tensor `key` has its parameter's shape (checked on load)."""
        return True

    def add_param_group(self, param_group: dict) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check_group(merged)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        check_state_layout(self._name, self, state_dict, self._state_shaped_like_param)
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)

    def _skips(self) -> SkipCounter:
        if "_skip_counter" not in self.__dict__:
            self._skip_counter = SkipCounter()
        return self._skip_counter

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient / Hessian estimate / loss (one host sync)."""
        return self._skips().value

    def _step_flag(self, tensors: Iterable[torch.Tensor | None], device: torch.device) -> torch.Tensor:
        """This step's skip flag on `device` (no host sync): non-finite `tensors` or a
        GradScaler's found_inf; counted."""
        _, fi = amp_tensors(self, device)
        flag = combine_flags(nonfinite_flag(tensors, device), fi)
        self._skips().add(flag)
        return flag
