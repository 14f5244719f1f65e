"""Loads the compiled module ``llmopt_ext._C`` (which registers torch.ops.llmopt_ext.*).

``import llmopt_ext`` never fails because of ``_C``: when it is missing or broken
a warning is issued once and every op runs its pure-PyTorch reference.

Environment variables:
    LLMOPT_REQUIRE_C=1   a missing ``_C`` is an ImportError (CI and the test command set
                         this, so tests cannot pass silently on the reference path).
    LLMOPT_DISABLE_C=1   do not load ``_C`` (to exercise the fallback).
"""
from __future__ import annotations

import os
import warnings

import torch

REBUILD_HINT = "build it with: pip install --no-build-isolation -e .  (see README.md)"

C = None
LOAD_ERROR: str | None = None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load() -> None:
    global C, LOAD_ERROR
    if _truthy("LLMOPT_DISABLE_C"):
        LOAD_ERROR = "disabled by LLMOPT_DISABLE_C=1"
    else:
        try:
            from . import _C as module  # noqa: PLC0415  (import registers the ops)

            C = module
        except (ImportError, OSError) as exc:
            LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    if C is None:
        message = f"llmopt_ext: the compiled module _C did not load ({LOAD_ERROR})"
        if _truthy("LLMOPT_REQUIRE_C"):
            raise ImportError(f"{message} and LLMOPT_REQUIRE_C=1; {REBUILD_HINT}")
        warnings.warn(
            f"{message}; every op runs its pure-PyTorch reference. To get the kernels, {REBUILD_HINT}",
            RuntimeWarning,
            stacklevel=3,
        )
    elif C.torch_version != torch.__version__:
        warnings.warn(
            f"llmopt_ext: _C was built against torch {C.torch_version} but torch "
            f"{torch.__version__} is installed; rebuild if ops misbehave ({REBUILD_HINT})",
            RuntimeWarning,
            stacklevel=3,
        )


_load()


def loaded() -> bool:
    return C is not None


def built_with_cuda() -> bool:
    return C is not None and bool(C.with_cuda)
