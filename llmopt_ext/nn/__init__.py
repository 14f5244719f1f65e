"""Drop-in modules: the fused LoRA Linear for peft (see :mod:`llmopt_ext.nn.lora`)."""
from .lora import (LoraLinear, fallback_counts, fuse_lora, fused_counts, reset_fallback_counts,
                   reset_fused_counts, use_fused_lora)

__all__ = ["LoraLinear", "use_fused_lora", "fuse_lora", "fallback_counts", "reset_fallback_counts",
           "fused_counts", "reset_fused_counts"]
