"""Optimizers of llmopt_ext: torch.optim.Optimizer subclasses and subspace-training helpers.

    from llmopt_ext.optim import TRCG, SophiaG, AdaHessian, GoLoreAdamW
"""
from .adahessian import AdaHessian
from .aisarah import AISARAH
from .lora_refresh import lora_full_grads, relora_refresh
from .oasis import OASIS
from .sophia import SophiaG, SophiaH, gnb_loss
from .subspace import GoLoreAdamW, SubspaceProjector
from .trcg import TRCG

__all__ = [
    "TRCG",
    "SophiaG", "SophiaH", "gnb_loss", "AdaHessian", "OASIS", "AISARAH",
    "SubspaceProjector", "GoLoreAdamW", "relora_refresh", "lora_full_grads",
]
