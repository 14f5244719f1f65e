"""``python -m llmopt_ext.info``: versions, built backends, device, and the path each op takes."""
from __future__ import annotations

import platform
import sys

import torch

import llmopt_ext
from llmopt_ext import _extension, backend


def _triton_version() -> str:
    try:
        import triton  # noqa: PLC0415

        return triton.__version__
    except Exception:  # noqa: BLE001
        return "not installed"


def report() -> str:
    lines = [
        f"llmopt_ext {llmopt_ext.__version__}  (python {platform.python_version()}, {sys.platform})",
        f"torch      {torch.__version__}  (CUDA {torch.version.cuda or 'none'})",
        f"triton     {_triton_version()}",
    ]
    if _extension.loaded():
        c = _extension.C
        lines.append(
            f"_C         loaded: CPU kernels{' (OpenMP)' if c.with_openmp else ''}"
            f"{', CUDA kernels' if c.with_cuda else ', no CUDA kernels'}; built against torch {c.torch_version}"
        )
    else:
        lines.append(f"_C         NOT loaded: {_extension.LOAD_ERROR}")
    if torch.cuda.is_available():
        lines.append(f"device     {torch.cuda.get_device_name()} (+ CPU, {torch.get_num_threads()} threads)")
    else:
        lines.append(f"device     CPU only ({torch.get_num_threads()} threads)")
    lines.append("backends   " + ", ".join(
        f"{b}: {'yes' if why is None else 'no (' + why + ')'}"
        for b, why in ((b, backend.unavailable_reason(b)) for b in backend.BACKENDS)
    ))
    forced = backend.forced()
    if forced:
        lines.append(f"forced     {forced}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines.append("")
    width = max(len(op) for op in backend.ops())
    lines.append(f"{'op':<{width}}  " + "  ".join(f"{d.type:<10}" for d in devices) + "  implemented by")
    for op, impls in sorted(backend.ops().items()):
        paths = []
        for d in devices:
            try:
                paths.append(backend.select(op, d))
            except RuntimeError as exc:
                paths.append(f"error: {exc}")
        lines.append(f"{op:<{width}}  " + "  ".join(f"{p:<10}" for p in paths) + "  " + ", ".join(impls))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
