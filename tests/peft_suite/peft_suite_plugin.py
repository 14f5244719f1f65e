"""pytest plugin that runs peft's own test suite against llmopt_ext's fused LoRA layer.

Loaded with ``-p peft_suite_plugin`` (scripts/peft_suite.sh puts this folder on PYTHONPATH).

* ``LLMOPT_PEFT_SUITE_FUSED=1``: every ``LoraConfig`` gets :func:`llmopt_ext.nn.use_fused_lora`
  when it is constructed (the documented path: peft's custom-module dispatch), so every LoRA
  Linear peft builds from a config is the fused layer; unset, peft runs unchanged.
* ``LLMOPT_PEFT_SUITE_SELECT``: a file of node-id globs; only matching tests run.
* ``LLMOPT_PEFT_SUITE_DESELECT``: a file of ``<glob>  # <reason>`` lines; matching tests are
  deselected (every line must give a reason).
* ``LLMOPT_PEFT_SUITE_COVERAGE``: where the fused pass writes its coverage JSON: fused and
  fallen-back forward calls by kind/reason, and per test whether it built a fused layer,
  ran the fused op, or only ever fell back to peft's forward.
"""
from __future__ import annotations

import fnmatch
import json
import os

import pytest

_FUSED = os.environ.get("LLMOPT_PEFT_SUITE_FUSED") == "1"
_BUILT = [0]
_TESTS = {"built_fused_layer": 0, "ran_fused_op": 0, "only_fell_back": 0, "built_but_no_forward": 0}


def read_globs(path: str, need_reason: bool) -> list[str]:
    """Non-empty, non-comment lines of `path`, the part before `#`; a line without a reason
    is an error when `need_reason` (a deselection must say why)."""
    globs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            pattern, _, reason = line.partition("#")
            pattern = pattern.strip()
            if not pattern:
                continue
            if need_reason and not reason.strip():
                raise pytest.UsageError(f"{path}:{n}: deselected pattern {pattern!r} gives no reason")
            globs.append(pattern)
    return globs


def _wrap_lora_config() -> None:
    from peft import LoraConfig

    from llmopt_ext.nn import LoraLinear, use_fused_lora

    post_init = LoraConfig.__post_init__

    def fused_post_init(self):
        post_init(self)
        use_fused_lora(self)

    LoraConfig.__post_init__ = fused_post_init
    init = LoraLinear.__init__

    def counted_init(self, *args, **kwargs):
        _BUILT[0] += 1
        init(self, *args, **kwargs)

    LoraLinear.__init__ = counted_init


def pytest_configure(config):
    if _FUSED:
        _wrap_lora_config()


def _matches(nodeid: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(nodeid, g) for g in globs)


def pytest_collection_modifyitems(config, items):
    select = os.environ.get("LLMOPT_PEFT_SUITE_SELECT")
    deselect = os.environ.get("LLMOPT_PEFT_SUITE_DESELECT")
    keep_globs = read_globs(select, False) if select else None
    drop_globs = read_globs(deselect, True) if deselect else []
    kept, dropped = [], []
    for item in items:
        ok = (keep_globs is None or _matches(item.nodeid, keep_globs)) and not _matches(item.nodeid, drop_globs)
        (kept if ok else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _totals() -> tuple[int, int]:
    from llmopt_ext.nn import fallback_counts, fused_counts

    return sum(fused_counts().values()), sum(fallback_counts().values())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not _FUSED:
        yield
        return
    built0, (fused0, fell0) = _BUILT[0], _totals()
    yield
    fused1, fell1 = _totals()
    if _BUILT[0] > built0 or fused1 > fused0 or fell1 > fell0:
        _TESTS["built_fused_layer"] += 1
        if fused1 > fused0:
            _TESTS["ran_fused_op"] += 1
        elif fell1 > fell0:
            _TESTS["only_fell_back"] += 1
        else:
            _TESTS["built_but_no_forward"] += 1


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("LLMOPT_PEFT_SUITE_COVERAGE")
    if not (_FUSED and out):
        return
    from llmopt_ext.nn import fallback_counts, fused_counts

    with open(out, "w") as f:
        json.dump({"fused_calls": fused_counts(), "fallback_calls": fallback_counts(), "tests": _TESTS,
                   "fused_layers_built": _BUILT[0]}, f, indent=1, sort_keys=True)
