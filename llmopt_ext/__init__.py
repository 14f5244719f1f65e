"""llmopt_ext: fast LoRA fine-tuning kernels and tuning-free second-order optimizers for PyTorch.

    import llmopt_ext
    llmopt_ext.ops.mt_dot(xs, ys)        # functional ops (see llmopt_ext.ops)
    llmopt_ext.optim.TRCG(params)        # optimizers (see llmopt_ext.optim)
    llmopt_ext.backends()                # which implementations are available here
    from llmopt_ext.nn import LoraLinear # peft integration (imports peft, so not loaded here)

``python -m llmopt_ext.info`` prints the build, the device and the path each op takes.
"""
from . import _extension, backend, ops, optim

__version__ = "0.1.0"


def backends() -> dict[str, bool]:
    """Backend name -> whether it is built and can run on this machine."""
    return backend.available()


__all__ = ["ops", "optim", "backend", "backends", "__version__"]
