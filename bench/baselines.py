"""Third-party baselines the benchmarks and tests compare against, imported defensively."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def galore_torch(module: str, attr: str):
    """``galore_torch.<module>.<attr>`` (e.g. ``("adamw", "AdamW")`` = GaLoreAdamW,
    ``("galore_projector", "GaLoreProjector")``), or None when galore-torch is not installed.
    Its package ``__init__`` imports bitsandbytes (for the 8-bit optimizer); when that import
    fails, the submodule is loaded under a bare package that skips the ``__init__``."""
    spec = importlib.util.find_spec("galore_torch")
    if spec is None:
        return None
    try:
        return getattr(importlib.import_module(f"galore_torch.{module}"), attr)
    except Exception:  # noqa: BLE001 - e.g. bitsandbytes missing
        pass
    name = "_galore_torch_bare"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = pkg
    try:
        return getattr(importlib.import_module(f"{name}.{module}"), attr)
    except Exception:  # noqa: BLE001
        return None
