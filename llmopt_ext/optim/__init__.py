"""Optimizers of llmopt_ext: torch.optim.Optimizer subclasses and subspace-training helpers.

    from llmopt_ext.optim import TRCG, SophiaG, AdaHessian, GoLoreAdamW, drive_step

Every optimizer here declares how it is driven (``llmopt_ext.optim.driver``: plain backward,
backward keeping the graph, or a closure); :func:`drive_step` takes one step of any of them,
and of any plain ``torch.optim.Optimizer``.
"""
from .adahessian import AdaHessian
from .aisarah import AISARAH
from .driver import StepContext, StepKind, drive_step
from .hyperadam import HyperAdamW
from .lora_refresh import lora_full_grads, relora_refresh
from .oasis import OASIS
from .schedule_free import WidthScheduleFree
from .sophia import SophiaG, SophiaH, gnb_loss
from .subspace import GoLoreAdamW, SubspaceProjector
from .trcg import TRCG

__all__ = [
    "TRCG", "drive_step", "StepContext", "StepKind",
    "HyperAdamW", "WidthScheduleFree", "SophiaG", "SophiaH", "gnb_loss", "AdaHessian", "OASIS", "AISARAH",
    "SubspaceProjector", "GoLoreAdamW", "relora_refresh", "lora_full_grads",
]
