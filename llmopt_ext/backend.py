"""Which implementation of an op runs: CUDA C++, Triton, CPU C++ or the pure-PyTorch reference.

The default is the fastest available path for the tensors' device:
``cuda > triton > reference`` on GPU tensors and ``cpu > reference`` on CPU tensors
(Triton runs on CPU tensors only when forced and ``TRITON_INTERPRET=1``).

Forcing one path, for debugging and benchmarks::

    LLMOPT_BACKEND=reference python train.py          # whole process
    with llmopt_ext.backend.use("cpu"): ...            # a block of code

A forced path that the op lacks, that cannot run on the tensors' device, or that
was not built raises RuntimeError; it never falls back silently.

Op modules declare each op once with :func:`register_op` and call it through
:func:`resolve`, which makes the choice above and returns the function to call.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Callable, Iterator, Union

import torch

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")

# The dispatch key each compiled backend's kernel is registered under (TORCH_LIBRARY_IMPL
# in csrc/torch/*_cpu.cpp, *_cuda.cpp); such ops also get a Meta kernel, their fake.
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

# An implementation: a callable, or "module:attribute" imported on first use (keeps e.g.
# triton from being imported until its backend is chosen).
Impl = Union[Callable, str]

# op name -> backends that implement it, filled by llmopt_ext.ops modules
_OPS: dict[str, tuple[str, ...]] = {}
_IMPLS: dict[tuple[str, str], Impl] = {}
_forced: list[str | None] = []  # innermost use(...) last


def register_op(name: str, backends: tuple[str, ...], impls: dict[str, Impl] | None = None) -> None:
    """Declares op `name` and the backends that implement it.

    ``impls`` maps a backend to its implementation where the default does not apply. The
    defaults: ``reference`` -> ``llmopt_ext.ops.reference.<name>``; ``cpu`` / ``cuda`` ->
    ``torch.ops.llmopt_ext.<name>.default`` (the dispatcher then picks the CPU or CUDA kernel
    from the tensors). ``triton`` has no default. E.g. lora_linear, whose CPU path is
    Python over its own custom ops and whose Triton path is a Python module::

        register_op("lora_linear", ("triton", "cpu", "reference"),
                    {"triton": "llmopt_ext.ops.triton.lora:lora_linear", "cpu": _lora_linear_cpu})
    """
    unknown = set(backends) - set(BACKENDS)
    impls = dict(impls or {})
    if unknown or not set(impls) <= set(backends):
        raise ValueError(f"{name}: unknown backends {sorted(unknown | (set(impls) - set(backends)))}")
    _OPS[name] = tuple(b for b in BACKENDS if b in backends)
    for key in [k for k in _IMPLS if k[0] == name]:  # a re-declaration replaces the old one
        del _IMPLS[key]
    for b, fn in impls.items():
        _IMPLS[(name, b)] = fn


def dispatcher_keys(op: str) -> tuple[str, ...]:
    """The dispatch keys ``torch.ops.llmopt_ext.<op>`` must have a kernel for in this build:
    CPU / CUDA for each compiled backend that was built (and is not overridden by a Python
    implementation), plus Meta (the fake) when there is any. Empty: the op is not in the
    dispatcher (it runs as Python)."""
    keys = []
    for b in ("cpu", "cuda"):
        if b in _OPS[op] and (op, b) not in _IMPLS and _built(b):
            keys.append(DISPATCH_KEYS[b])
    return tuple(keys + ["Meta"]) if keys else ()


def _built(backend: str) -> bool:
    return _extension.loaded() and (backend != "cuda" or _extension.built_with_cuda())


def ops() -> dict[str, tuple[str, ...]]:
    """Every registered op and the backends that implement it."""
    return dict(_OPS)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def unavailable_reason(backend: str) -> str | None:
    """None if `backend` was built and can run on this machine, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        return None if _extension.loaded() else f"_C did not load ({_extension.LOAD_ERROR})"
    if backend == "cuda":
        if not _extension.loaded():
            return f"_C did not load ({_extension.LOAD_ERROR})"
        if not _extension.built_with_cuda():
            return "_C was built without CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if not (torch.cuda.is_available() or _interpreting()):
            return "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def available() -> dict[str, bool]:
    return {b: unavailable_reason(b) is None for b in BACKENDS}


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _interpreting())
    return device.type == backend


def forced() -> str | None:
    """The forced backend (innermost `use(...)`, else $LLMOPT_BACKEND), or None."""
    if _forced:
        return _forced[-1]
    name = os.environ.get("LLMOPT_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise RuntimeError(f"LLMOPT_BACKEND={name!r} is not one of {BACKENDS} (or 'auto')")
    return name


@contextlib.contextmanager
def use(backend: str | None) -> Iterator[None]:
    """Force `backend` for ops called inside the block (None: automatic choice, ignoring
    $LLMOPT_BACKEND)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def _load(impl: Impl) -> Callable:
    if callable(impl):
        return impl
    module, _, attr = impl.partition(":")
    return getattr(importlib.import_module(module), attr)


def implementation(op: str, backend: str) -> Callable:
    """The function that runs `op` on `backend` (see register_op for the defaults)."""
    if backend not in _OPS[op]:
        raise RuntimeError(f"{op} has no {backend} implementation (it has: {', '.join(_OPS[op])})")
    impl = _IMPLS.get((op, backend))
    if impl is not None:
        if not callable(impl):  # "module:attr", imported once (torch.compile cannot trace imports)
            impl = _IMPLS[(op, backend)] = _load(impl)
        return impl
    if backend == "reference":
        return getattr(importlib.import_module("llmopt_ext.ops.reference"), op)
    if backend == "triton":
        raise RuntimeError(f"{op}: its triton implementation was not given to register_op")
    return getattr(torch.ops.llmopt_ext, op).default


def resolve(op: str, device: torch.device) -> Callable:
    """The function that runs `op` on tensors of `device`: the backend :func:`select` picks
    (forced or automatic), as :func:`implementation`. Every op module calls its ops through
    this; the caller has already validated the arguments it needs to pick `device`."""
    return implementation(op, select(op, device))


def select(op: str, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device`."""
    impls = _OPS[op]
    want = forced()
    if want is not None:
        if want not in impls:
            raise RuntimeError(
                f"backend {want!r} is forced but {op} has no {want} implementation "
                f"(it has: {', '.join(impls)})"
            )
        if not _runs_on(want, device):
            raise RuntimeError(f"backend {want!r} is forced but cannot run {op} on {device.type} tensors")
        why = unavailable_reason(want)
        if why is not None:
            raise RuntimeError(f"backend {want!r} is forced for {op} but unavailable: {why}")
        return want
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    for b in order:
        if b in impls and _runs_on(b, device) and unavailable_reason(b) is None:
            return b
    return "reference"
