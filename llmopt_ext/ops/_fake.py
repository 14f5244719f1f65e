"""Fake (meta) implementations of the LoRA merge ops, so they trace under torch.compile and
FakeTensorMode. Registered only when _C (which defines the schemas) is loaded.

Every other op registers its fake next to its wrapper (multi_tensor.py, optim_update.py,
stiefel.py), with the checks of its reference; these two belong next to
llmopt_ext/ops/lora.py's wrappers and move there with that module's checks.
"""
from __future__ import annotations

import torch


def register() -> None:
    lib = "llmopt_ext::"

    @torch.library.register_fake(lib + "lora_merge_")
    def _lora_merge_(weight, lora_A, lora_B, scaling, fan_in_fan_out=False):
        return None

    @torch.library.register_fake(lib + "lora_unmerge_")
    def _lora_unmerge_(weight, lora_A, lora_B, scaling, fan_in_fan_out=False):
        return None
