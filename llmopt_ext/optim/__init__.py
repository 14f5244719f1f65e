"""Optimizers of llmopt_ext."""
from .subspace import GoLoreAdamW, SubspaceProjector

__all__ = ["SubspaceProjector", "GoLoreAdamW"]
