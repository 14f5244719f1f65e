"""Packaging behaviour: import without _C, LLMOPT_REQUIRE_C, forced backends, info."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import llmopt_ext
from llmopt_ext import backend, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOPT_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
        timeout=300,
    )


def test_import_without_C_warns_once_and_uses_the_reference():
    code = (
        "import torch, llmopt_ext\n"
        "from llmopt_ext import ops, backend\n"
        "import llmopt_ext.ops\n"
        "assert not llmopt_ext.backends()['cpu']\n"
        "assert backend.select('mt_dot', torch.device('cpu')) == 'reference'\n"
        "print(float(ops.mt_dot([torch.ones(3)], [torch.ones(3)])))\n"
    )
    r = python(code, LLMOPT_DISABLE_C="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3.0"
    assert r.stderr.count("RuntimeWarning") == 1 and "_C did not load" in r.stderr


def test_require_C_turns_a_missing_C_into_an_import_error():
    r = python("import llmopt_ext", LLMOPT_DISABLE_C="1", LLMOPT_REQUIRE_C="1")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "LLMOPT_REQUIRE_C=1" in r.stderr


def test_kernels_are_loaded_when_required():
    # The test command sets LLMOPT_REQUIRE_C=1: then the suite must run on the kernels.
    if os.environ.get("LLMOPT_REQUIRE_C") != "1":
        pytest.skip("LLMOPT_REQUIRE_C is not set")
    assert llmopt_ext.backends()["cpu"]
    assert backend.select("mt_dot", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize(
    "forced,words",
    [("triton", "mt_dot has no triton implementation"), ("bogus", "is not one of")]
    + ([] if torch.cuda.is_available() else [("cuda", "cannot run mt_dot on cpu tensors")]),
)
def test_forcing_an_unavailable_backend_raises(forced, words):
    r = python(
        "import torch, llmopt_ext.ops as o\no.mt_dot([torch.ones(2)], [torch.ones(2)])",
        LLMOPT_BACKEND=forced,
    )
    assert r.returncode != 0 and "RuntimeError" in r.stderr and words in r.stderr, r.stderr


def test_forcing_reference_in_process():
    with backend.use("reference"):
        assert backend.select("mt_dot", torch.device("cpu")) == "reference"
        with backend.use(None):
            assert backend.select("mt_dot", torch.device("cpu")) == ("cpu" if llmopt_ext.backends()["cpu"] else "reference")
    with pytest.raises(ValueError):
        with backend.use("gpu"):
            pass
    x = [torch.ones(3)]
    with backend.use("reference"):
        assert float(ops.mt_dot(x, x)) == 3.0


def test_info_reports_every_op_and_backend():
    r = python("import llmopt_ext.info as i; i.main()")
    assert r.returncode == 0, r.stderr
    for op in backend.ops():
        assert op in r.stdout
    for word in ("torch", "_C", "backends", "cuda", "cpu", "reference"):
        assert word in r.stdout
