"""Fake (meta) implementations of the C++ ops, so they trace under torch.compile and
FakeTensorMode. Registered only when _C (which defines the schemas) is loaded."""
from __future__ import annotations

import torch


def register() -> None:
    lib = "llmopt_ext::"

    @torch.library.register_fake(lib + "mt_dot")
    def _mt_dot(xs, ys):
        return xs[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake(lib + "mt_norm_sq")
    def _mt_norm_sq(xs):
        return xs[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake(lib + "mt_axpby_")
    def _mt_axpby_(ys, xs, a, b):
        return None

    @torch.library.register_fake(lib + "mt_cg_step_")
    def _mt_cg_step_(xs, rs, ps, hps, alpha, minv=None):
        return xs[0].new_empty((3,), dtype=torch.float32)

    @torch.library.register_fake(lib + "mt_cg_direction_")
    def _mt_cg_direction_(ps, rs, beta, minv=None):
        return None

    # ---- fused optimizer updates (in place, no outputs)
    @torch.library.register_fake(lib + "sophia_update_")
    def _sophia_update_(params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps,
                        clip=False, grad_scale=None, found_inf=None):
        return None

    @torch.library.register_fake(lib + "adahessian_update_")
    def _adahessian_update_(params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, step, lr,
                            beta1, beta2, weight_decay, eps, hessian_power, grad_scale=None,
                            found_inf=None):
        return None

    # ---- LoRA merge / unmerge (llmopt_ext/ops/lora.py): in place, no outputs
    @torch.library.register_fake(lib + "lora_merge_")
    def _lora_merge_(weight, lora_A, lora_B, scaling, fan_in_fan_out=False):
        return None

    @torch.library.register_fake(lib + "lora_unmerge_")
    def _lora_unmerge_(weight, lora_A, lora_B, scaling, fan_in_fan_out=False):
        return None

    # ---- random Stiefel matrices (llmopt_ext/ops/stiefel.py)
    @torch.library.register_fake(lib + "philox_normal_")
    def _philox_normal_(out, seed, offset):
        return None

    @torch.library.register_fake(lib + "orthonormalize")
    def _orthonormalize(x):
        return x.new_empty(x.shape)
