"""Public functional API of llmopt_ext: one documented function per op.

Each function validates its arguments, picks a backend (see :mod:`llmopt_ext.backend`)
and calls ``torch.ops.llmopt_ext.<op>`` (CUDA or CPU C++), a Triton kernel, or the
pure-PyTorch reference in :mod:`llmopt_ext.ops.reference`.
"""
from .. import _extension, backend
from .lora import lora_linear, lora_merge_, lora_unmerge_
from .multi_tensor import mt_axpby_, mt_cg_direction_, mt_cg_step_, mt_dot, mt_norm_sq
from .optim_update import adahessian_update_, sophia_update_
from .stiefel import orthonormalize, philox_normal_, random_stiefel


if _extension.loaded():
    from . import _fake

    _fake.register()

__all__ = [
    "mt_dot", "mt_norm_sq", "mt_axpby_", "mt_cg_step_", "mt_cg_direction_",
    "sophia_update_", "adahessian_update_",
    "lora_linear", "lora_merge_", "lora_unmerge_",
    "philox_normal_", "orthonormalize", "random_stiefel",
]
