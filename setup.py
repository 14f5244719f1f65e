"""Build of llmopt_ext and its compiled module llmopt_ext._C.

Build with build isolation OFF:

    pip install --no-build-isolation .        # or -e . for development

An isolated build creates a fresh environment and installs the newest torch
into it (a multi-GB CUDA wheel), then compiles against that torch's headers
and ABI instead of the torch you will import at run time. So torch is not a
build requirement in pyproject.toml; it must already be installed.

Environment variables:
  LLMOPT_WITH_CUDA=1|0   force the CUDA kernels on or off (default: on when
                         torch has CUDA and nvcc is found).
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default here: sm_80 and sm_90a
                         SASS plus compute_90 PTX for newer GPUs).
  MAX_JOBS               parallel compile jobs (ninja).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension, CUDAExtension,
                                           include_paths)
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.exit(
        "llmopt_ext: PyTorch must be installed before building this package, and the build "
        "must not be isolated:\n    pip install torch && pip install --no-build-isolation .\n"
        "(an isolated build would download another torch and compile against its ABI)"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",  # PTX, JIT-compiled on newer GPUs
]


def read_flags(kind):
    """The compiler flags in csrc/flags/<kind>.txt (shared with CMakeLists.txt): one per
    line, '#' lines are comments."""
    with open(os.path.join(ROOT, "csrc", "flags", f"{kind}.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    flag = os.environ.get("LLMOPT_WITH_CUDA", "").strip().lower()
    nvcc = CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    if flag in ("1", "on", "true", "yes"):
        if torch.version.cuda is None:
            sys.exit(
                "llmopt_ext: LLMOPT_WITH_CUDA=1 but the installed torch "
                f"{torch.__version__} has no CUDA; install a CUDA build of torch or unset it"
            )
        if not nvcc:
            sys.exit("llmopt_ext: LLMOPT_WITH_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    if flag in ("0", "off", "false", "no"):
        return False
    return torch.version.cuda is not None and nvcc


def _extension():
    with_cuda = _want_cuda()
    sources = _rel("csrc/cpu/*.cpp") + _rel("csrc/torch/*.cpp")
    cuda_glue = _rel("csrc/torch/*_cuda.cpp")
    if not with_cuda:
        sources = [s for s in sources if s not in cuda_glue]
    else:
        sources += _rel("csrc/kernels/*.cu")
    # torch's headers as system headers: -Wall -Wextra (csrc/flags/cxx.txt) then warn about
    # our code only (torch 2.13's headers alone raise ~40 -Wunused-parameter warnings). GCC
    # drops a -I directory that is also given with -isystem.
    system_includes = [f"-isystem{p}" for p in include_paths(device_type="cuda" if with_cuda else "cpu")]
    cxx = read_flags("cxx") + system_includes + [
        "-g0",
        "-fopenmp",
        f'-DLLMOPT_TORCH_VERSION="{torch.__version__}"',
        f"-DLLMOPT_WITH_CUDA={int(with_cuda)}",
    ]
    kwargs = dict(
        name="llmopt_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        nvcc = read_flags("nvcc")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += DEFAULT_CUDA_GENCODE
        return CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    name="llmopt_ext",
    version="0.1.0",
    description="Fast LoRA layers, tuning-free second-order optimizers and subspace training "
    "for PyTorch (C++/CUDA/Triton kernels)",
    packages=find_packages(include=["llmopt_ext", "llmopt_ext.*"]),
    # the embedded base model and tokenizer of the fine-tuning default (2.7 MB)
    package_data={"llmopt_ext.finetune": ["assets/base/*.json", "assets/base/*.safetensors"]},
    python_requires=">=3.9",
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["llmopt-info=llmopt_ext.info:main",
                                      "llmopt-finetune=llmopt_ext.finetune.cli:main",
                                      "llmopt-serve=llmopt_ext.finetune.serve:main"]},
    # pip install -e '.[serve]': llmopt-serve's HTTP stack (openai: the client its tests use);
    # '.[qlora]': bitsandbytes, whose 0.50 NF4 Linear4bit runs on CPU too
    extras_require={"serve": ["fastapi", "uvicorn", "openai"], "qlora": ["bitsandbytes==0.50.2"]},
    zip_safe=False,
)
