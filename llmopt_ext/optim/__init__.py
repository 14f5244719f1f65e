"""Optimizers of llmopt_ext."""
from .lora_refresh import lora_full_grads, relora_refresh
from .subspace import GoLoreAdamW, SubspaceProjector

__all__ = ["SubspaceProjector", "GoLoreAdamW", "relora_refresh", "lora_full_grads"]
