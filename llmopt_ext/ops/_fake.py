"""Fake (meta) implementations of the LoRA merge ops, so they trace under torch.compile and
FakeTensorMode. Registered only when _C (which defines the schemas) is loaded.

Every other op registers its fake next to its wrapper (multi_tensor.py, optim_update.py,
stiefel.py), with the checks of its reference; these two belong next to
llmopt_ext/ops/lora.py's wrappers and move there with that module's checks.
"""
from __future__ import annotations

import torch

from ._lora_checks import check_merge


def register() -> None:
    lib = "llmopt_ext::"

    # check_merge reads no tensor value: it is what the reference checks, and a meta
    # tensor among CPU ones (dispatched here) is rejected instead of silently accepted.
    @torch.library.register_fake(lib + "lora_merge_")
    def _lora_merge_(weight, lora_A, lora_B, scaling, fan_in_fan_out=False):
        check_merge("lora_merge_", weight, lora_A, lora_B, scaling, fan_in_fan_out)

    @torch.library.register_fake(lib + "lora_unmerge_")
    def _lora_unmerge_(weight, lora_A, lora_B, scaling, fan_in_fan_out=False):
        check_merge("lora_unmerge_", weight, lora_A, lora_B, scaling, fan_in_fan_out)
