"""Helpers shared by the layer-level peft-fidelity tests: run a peft LoRA layer, its fused
copy and its float64 twin on the same input, and compare each output against the twin."""
from __future__ import annotations

import copy

import torch

from llmopt_ext import nn as lnn

MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def trainable(layer) -> list[torch.Tensor]:
    """The layer's trainable parameters in name order."""
    return [p for _, p in sorted(layer.named_parameters()) if p.requires_grad]


def run_grads(layer, x, gy, seed=None) -> list[torch.Tensor]:
    """[y, dx, d(every trainable parameter)] for the output gradient gy."""
    if seed is not None:
        torch.manual_seed(seed)
    y = layer(x)
    return [y] + list(torch.autograd.grad(y, [x] + trainable(layer), gy))


def fused_peft_oracle(ref, dtype, in_features: int, out_features: int, run=run_grads):
    """(fused, peft, float64 twin) outputs of ``run`` on one random (2, 5, in) input in
    ``dtype``: the fused layer is a deep copy of ``ref`` through ``fuse_lora``."""
    fused = copy.deepcopy(ref)
    assert lnn.fuse_lora(fused) == 1
    oracle = copy.deepcopy(ref).double()
    x = torch.randn(2, 5, in_features).to(dtype).requires_grad_()
    gy = torch.randn(2, 5, out_features).to(dtype)
    want = run(oracle, x.detach().double().requires_grad_(), gy.double())
    got_peft = run(ref, x, gy)
    return run(fused, x, gy), got_peft, want, x


def assert_close_to_oracle(got, got_peft, want, dtype) -> None:
    """Each output within 2x peft's own error against the float64 twin, plus 4 ulps of the
    largest value (the summation order differs)."""
    for i, (g_ours, g_peft, w) in enumerate(zip(got, got_peft, want)):
        assert g_ours.dtype == g_peft.dtype and g_ours.shape == g_peft.shape, i
        err = (g_ours.double() - w).abs().max().item()
        err_peft = (g_peft.double() - w).abs().max().item()
        slack = 4 * 2.0 ** -MANT[dtype] * w.abs().max().item()
        assert err <= 2 * err_peft + slack, f"output {i}: ours {err:.3g} peft {err_peft:.3g} slack {slack:.3g}"
