"""Optimizers built on llmopt_ext's fused ops.

    from llmopt_ext.optim import TRCG
"""
from .trcg import TRCG

__all__ = ["TRCG"]
