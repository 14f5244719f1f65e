"""Optimizers of llmopt_ext (torch.optim.Optimizer subclasses)."""
from .adahessian import AdaHessian
from .aisarah import AISARAH
from .oasis import OASIS
from .sophia import SophiaG, SophiaH, gnb_loss

__all__ = ["SophiaG", "SophiaH", "gnb_loss", "AdaHessian", "OASIS", "AISARAH"]
