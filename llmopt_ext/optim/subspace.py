"""GaLore / GoLore subspace training: low-rank projectors and a projected AdamW.

GaLore (Zhao et al., 2024) runs Adam on ``P^T G`` (or ``G Q``), the gradient projected on the
top-``rank`` singular subspace of the current gradient, refreshed every ``update_proj_gap``
steps, and maps the update back with ``P``. GoLore (He et al., 2024, "Subspace Optimization for
Large Language Models with Convergence Guarantees") shows that this stalls when the stochastic
gradient is noise-dominated (the SVD then picks the noise), and fixes it by drawing the
projector uniformly from the Stiefel manifold instead; in practice SVD early (large, informative
gradients) and random late: ``SVD while step < rand_ratio * total_steps``, random after.

Projection types (as in GaLore): ``left`` projects ``G (m x n)`` to ``P^T G (rank x n)`` with
``P`` m x rank; ``right`` to ``G Q (m x rank)`` with ``Q`` n x rank; ``std`` picks the side that
gives the smaller state (right when m >= n, else left); ``reverse_std`` the other one.

Differences from the reference implementations, on purpose:
  * on a projector refresh the first moment is rotated into the new subspace
    (``M <- P_new^T P_old M``), the second moment by the squared rotation (exact when the
    subspace is unchanged up to signs and permutations), or both are reset
    (``moment_transfer="reset"``; ``"keep"`` is GaLore's behaviour of reusing them as they are);
  * random projectors come from :func:`llmopt_ext.ops.random_stiefel` with a per-parameter Philox
    stream ``(seed, stream << 32 | refresh_index)``, so they are reproducible, identical on every
    DDP rank and restored exactly by ``load_state_dict``;
  * optimizer state is float32 whatever the parameter dtype (bf16 parameters are updated in
    float32 and rounded once).
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterable

import torch

from ..ops.stiefel import SEED_LIMIT, draw_seed, random_stiefel
from ._common import GuardedOptimizer, check_adam_group, check_pos, nonfinite_flag

PROJ_TYPES = ("left", "right", "std", "reverse_std")
MOMENT_TRANSFERS = ("rotate", "reset", "keep")


def _side(proj_type: str, shape: torch.Size) -> str:
    m, n = shape
    if proj_type in ("left", "right"):
        return proj_type
    if proj_type == "std":
        return "right" if m >= n else "left"
    return "left" if m >= n else "right"  # reverse_std


class SubspaceProjector:
    """Low-rank projector of one 2-D gradient, refreshed every ``update_proj_gap`` steps.

    Args:
        rank: subspace dimension r (1 <= r <= min(m, n) of the gradients it sees).
        update_proj_gap: refresh the basis when ``step % update_proj_gap == 0``.
        scale: factor applied by :meth:`project_back` (GaLore's alpha).
        proj_type: ``left``, ``right``, ``std`` or ``reverse_std`` (module docstring).
        rand_ratio: SVD basis while ``step < rand_ratio * total_steps``, random Stiefel after
            (1.0: GaLore, 0.0: pure GoLore; other values need ``total_steps``).
        total_steps: training length for ``rand_ratio``.
        seed, stream: the random bases are ``random_stiefel(.., seed=seed,
            offset=stream * 2**32 + refresh_index)``; ``seed=None`` draws one from torch's
            global generator.
    """

    def __init__(self, rank: int, update_proj_gap: int = 200, scale: float = 1.0,
                 proj_type: str = "std", rand_ratio: float = 1.0, total_steps: int | None = None,
                 *, seed: int | None = None, stream: int = 0):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"SubspaceProjector: rank must be an int >= 1, got {rank!r}")
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
            raise ValueError(f"SubspaceProjector: update_proj_gap must be an int >= 1, got {update_proj_gap!r}")
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"SubspaceProjector: proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
        if not 0.0 <= float(rand_ratio) <= 1.0:
            raise ValueError(f"SubspaceProjector: rand_ratio must be in [0, 1], got {rand_ratio}")
        if 0.0 < rand_ratio < 1.0 and (total_steps is None or total_steps < 1):
            raise ValueError("SubspaceProjector: 0 < rand_ratio < 1 needs total_steps >= 1 "
                             f"(SVD for the first rand_ratio * total_steps steps), got {total_steps!r}")
        if not 0 <= stream < 2**31:
            raise ValueError(f"SubspaceProjector: stream must be in [0, 2**31), got {stream}")
        self.rank, self.update_proj_gap, self.scale = rank, update_proj_gap, float(scale)
        self.proj_type, self.rand_ratio, self.total_steps = proj_type, float(rand_ratio), total_steps
        self.seed = draw_seed() if seed is None else int(seed) % SEED_LIMIT
        self.stream = stream
        self.basis: torch.Tensor | None = None  # orthonormal columns: m x r (left) or n x r (right)
        self.side: str | None = None
        self.refreshes = 0
        self.last_mode: str | None = None  # "svd" or "random", for logging and tests

    # -- schedule ---------------------------------------------------------------------------
    def use_svd(self, step: int) -> bool:
        if self.rand_ratio >= 1.0:
            return True
        if self.rand_ratio <= 0.0:
            return False
        return step < self.rand_ratio * self.total_steps

    def needs_refresh(self, step: int) -> bool:
        return self.basis is None or step % self.update_proj_gap == 0

    # -- basis ------------------------------------------------------------------------------
    def _check_grad(self, grad: torch.Tensor) -> None:
        if grad.dim() != 2:
            raise ValueError(f"SubspaceProjector: gradients must be 2-D, got shape {tuple(grad.shape)}")
        if self.rank > min(grad.shape):
            raise ValueError(f"SubspaceProjector: rank={self.rank} exceeds min(m, n)={min(grad.shape)} "
                             f"of the gradient of shape {tuple(grad.shape)}")
        if self.side is not None and self.basis is not None:
            dim = grad.shape[0] if self.side == "left" else grad.shape[1]
            if dim != self.basis.shape[0]:
                raise ValueError(f"SubspaceProjector: gradient shape {tuple(grad.shape)} does not match "
                                 f"the basis ({self.side}, {tuple(self.basis.shape)})")

    def compute_basis(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """The new basis for `grad` at `step` (does not install it)."""
        self._check_grad(grad)
        side = _side(self.proj_type, grad.shape)
        dim = grad.shape[0] if side == "left" else grad.shape[1]
        if self.use_svd(step):
            self.last_mode = "svd"
            g = grad.float()
            if not bool(torch.isfinite(g).all()):
                raise ValueError("SubspaceProjector: the gradient contains NaN or Inf")
            # The refresh GaLore pays for: 13.9 s at 4096 x 4096 on 2 CPU cores.
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            basis = u[:, : self.rank] if side == "left" else vh[: self.rank].mT
        else:
            self.last_mode = "random"
            basis = random_stiefel(dim, self.rank, seed=self.seed,
                                   offset=(self.stream << 32) + self.refreshes, device=grad.device)
        self.side = side
        return basis.float().contiguous()

    def refresh(self, grad: torch.Tensor, step: int) -> torch.Tensor | None:
        """Install a new basis; returns the previous one (None on the first call)."""
        old = self.basis
        self.basis = self.compute_basis(grad, step)
        self.refreshes += 1
        return old

    # -- projections ------------------------------------------------------------------------
    def project(self, grad: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Low-rank coordinates of `grad` (float32); refreshes first when `step` says so."""
        if step is not None and self.needs_refresh(step):
            self.refresh(grad, step)
        if self.basis is None:
            raise RuntimeError("SubspaceProjector: no basis yet; call refresh() or pass step")
        self._check_grad(grad)
        g = grad.float()
        return self.basis.mT @ g if self.side == "left" else g @ self.basis

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        """Full-size ``scale * P low`` (left) or ``scale * low Q^T`` (right), float32."""
        full = self.basis @ low if self.side == "left" else low @ self.basis.mT
        return full * self.scale

    def transfer(self, moment: torch.Tensor, old_basis: torch.Tensor, squared: bool = False) -> torch.Tensor:
        """Express a moment kept in `old_basis` coordinates in the current basis.

        First moment: ``C M`` (left) / ``M C^T`` (right) with ``C = P_new^T P_old``, the exact
        coordinates of its projection on the new subspace. Second moment (``squared``): the same
        with ``C * C`` elementwise, which keeps it non-negative and is exact when the new basis is
        the old one up to signs and permutations.
        """
        c = self.basis.mT @ old_basis
        if squared:
            c = c * c
        return c @ moment if self.side == "left" else moment @ c.mT

    # -- serialisation ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"basis": self.basis, "side": self.side, "refreshes": self.refreshes,
                "seed": self.seed, "stream": self.stream, "last_mode": self.last_mode}

    def load_state_dict(self, state: dict) -> None:
        basis = state["basis"]
        self.basis = None if basis is None else basis.detach().clone().float()
        self.side, self.refreshes = state["side"], int(state["refreshes"])
        self.seed, self.stream = int(state["seed"]), int(state["stream"])
        self.last_mode = state.get("last_mode")


class GoLoreAdamW(GuardedOptimizer):
    """AdamW in a low-rank subspace of each 2-D gradient (GaLore / GoLore).

    Parameters of groups with ``rank`` set (the constructor default applies to every group) that
    are 2-D with ``min(shape) > rank`` are trained in the projected space; every other parameter
    gets plain AdamW. Per group: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``,
    ``rand_ratio``, ``total_steps``, ``moment_transfer`` (``rotate``: carry the moments into the
    new subspace on a refresh; ``reset``: zero them and restart bias correction; ``keep``:
    GaLore's reuse as-is). ``rand_ratio=1.0`` is GaLore, ``0.0`` is pure GoLore.

    State is float32 for any parameter dtype. ``state_dict()`` holds the projectors (basis,
    seed, stream, refresh count), so a resumed run is identical. ``seed=None`` draws the
    projector seed from torch's global generator, broadcast from rank 0 under
    ``torch.distributed`` so all ranks draw the same random subspaces.

    A step with a NaN/Inf gradient is skipped (one host sync per step: the SVD refresh needs
    finite gradients anyway) and counted in ``skipped_steps``.
    """

    _name = "GoLoreAdamW"

    # driving contract (llmopt_ext.optim.driver): a plain backward optimizer
    default_lr = 2e-3

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = 128,
                 update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 rand_ratio: float = 0.0, total_steps: int | None = None,
                 moment_transfer: str = "rotate", seed: int | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        rand_ratio=rand_ratio, total_steps=total_steps, moment_transfer=moment_transfer)
        super().__init__(params, defaults)
        self.seed = self._shared_seed(seed)

    def _check_group(self, group: dict) -> None:
        check_adam_group(group)
        check_pos("scale", group["scale"])
        if group["moment_transfer"] not in MOMENT_TRANSFERS:
            raise ValueError(f"GoLoreAdamW: moment_transfer must be one of {MOMENT_TRANSFERS}, "
                             f"got {group['moment_transfer']!r}")
        if group["rank"] is not None:  # validates the projector options up front
            SubspaceProjector(group["rank"], group["update_proj_gap"], group["scale"],
                              group["proj_type"], group["rand_ratio"], group["total_steps"], seed=0)

    @staticmethod
    def _shared_seed(seed: int | None) -> int:
        if seed is not None:
            return int(seed) % SEED_LIMIT
        value = draw_seed()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([value], dtype=torch.int64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.broadcast(t, src=0)
            value = int(t.item())
        return value

    def _params(self) -> list[torch.Tensor]:
        return list(itertools.chain.from_iterable(g["params"] for g in self.param_groups))

    def _projected(self, group: dict, p: torch.Tensor) -> bool:
        return group["rank"] is not None and p.dim() == 2 and min(p.shape) > group["rank"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for p in self._params() if p.grad is not None]
        if grads and bool(nonfinite_flag(grads, grads[0].device)):
            self._skips().add(True)  # parameters, moments and projectors stay as they were
            return loss
        index = {id(p): i for i, p in enumerate(self._params())}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GoLoreAdamW does not support sparse gradients")
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["moment_step"] = 0
                proj: SubspaceProjector | None = state.get("projector")
                if self._projected(group, p):
                    if proj is None:
                        proj = SubspaceProjector(group["rank"], group["update_proj_gap"], group["scale"],
                                                 group["proj_type"], group["rand_ratio"],
                                                 group["total_steps"], seed=self.seed, stream=index[id(p)])
                        state["projector"] = proj
                    if proj.needs_refresh(state["step"]):
                        old = proj.refresh(grad, state["step"])
                        if old is not None and "exp_avg" in state:
                            self._transfer(group["moment_transfer"], state, proj, old)
                    g = proj.project(grad)
                else:
                    g = grad
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(g, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(g, dtype=torch.float32)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                state["moment_step"] += 1
                t = state["moment_step"]
                exp_avg.lerp_(g, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
                update = (exp_avg / bc1) / ((exp_avg_sq / bc2).sqrt_().add_(eps))
                if proj is not None:
                    update = proj.project_back(update)
                # float32 arithmetic, one rounding into the parameter's dtype
                p32 = p.float()
                if wd != 0.0:
                    p32.mul_(1.0 - lr * wd)
                p32.add_(update, alpha=-lr)
                p.copy_(p32)
        return loss

    @staticmethod
    def _transfer(mode: str, state: dict, proj: SubspaceProjector, old: torch.Tensor) -> None:
        if mode == "keep":
            return
        if mode == "reset":
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
            state["moment_step"] = 0
            return
        state["exp_avg"] = proj.transfer(state["exp_avg"], old)
        state["exp_avg_sq"] = proj.transfer(state["exp_avg_sq"], old, squared=True)

    def _check_layout(self, state_dict: dict) -> None:
        """Refuse the state of other parameter shapes before loading anything."""
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        params = self._params()
        if len(saved_ids) != len(params):
            raise ValueError(f"GoLoreAdamW.load_state_dict: the state_dict has {len(saved_ids)} "
                             f"parameters, the optimizer {len(params)}")
        for i, (pid, p) in enumerate(zip(saved_ids, params)):
            s = state_dict["state"].get(pid, {})
            want = tuple(p.shape)
            proj = s.get("projector")
            if proj is not None and proj["basis"] is not None:
                basis, side = tuple(proj["basis"].shape), proj["side"]
                if p.dim() != 2 or basis[0] != (p.shape[0] if side == "left" else p.shape[1]):
                    raise ValueError(f"GoLoreAdamW.load_state_dict: the projector basis of parameter {i} "
                                     f"has shape {basis}, not one for a parameter of shape {want}")
                want = (basis[1], p.shape[1]) if side == "left" else (p.shape[0], basis[1])
            for key in ("exp_avg", "exp_avg_sq"):
                if key in s and tuple(s[key].shape) != want:
                    raise ValueError(f"GoLoreAdamW.load_state_dict: state {key!r} of parameter {i} has "
                                     f"shape {tuple(s[key].shape)}, expected {want} (another layout)")

    # -- serialisation: projectors as plain dicts, state kept in float32 --------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = {k: {**s, "projector": s["projector"].state_dict()} if "projector" in s else dict(s)
                       for k, s in sd["state"].items()}
        sd["golore_seed"] = self.seed
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's loader casts floating state to the parameter dtype (bf16 state for bf16
        # parameters, losing bits); restore the per-parameter state ourselves instead.
        saved_state = state_dict["state"]
        self._check_layout(state_dict)
        light = {k: v for k, v in state_dict.items() if k not in ("state", "golore_seed")}
        light["state"] = {}
        super().load_state_dict(light)
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        for pid, p in zip(saved_ids, self._params()):
            if pid not in saved_state:
                continue
            s = copy.deepcopy(saved_state[pid])
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    s[k] = v.to(p.device)
            if "projector" in s:
                group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
                proj = SubspaceProjector(group["rank"], group["update_proj_gap"], group["scale"],
                                         group["proj_type"], group["rand_ratio"], group["total_steps"],
                                         seed=0)
                pstate = dict(s["projector"])
                if pstate["basis"] is not None:
                    pstate["basis"] = pstate["basis"].to(p.device)
                proj.load_state_dict(pstate)
                s["projector"] = proj
            self.state[p] = s
        self.seed = int(state_dict.get("golore_seed", self.seed))
