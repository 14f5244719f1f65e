"""One source of compiler flags: setup.py and CMakeLists.txt both read csrc/flags/*.txt and
neither repeats a flag from there (a flag edited in one place reaches both builds)."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _flags(kind: str) -> list[str]:
    return [ln.strip() for ln in _read("csrc", "flags", f"{kind}.txt").splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def test_flag_files_hold_the_numerics_and_warning_flags():
    cxx = _flags("cxx")
    for flag in ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-Wall", "-Wextra"):
        assert flag in cxx
    assert "-O3" in _flags("nvcc")


def test_setup_and_cmake_read_the_flag_files_and_do_not_repeat_them():
    setup, cmake = _read("setup.py"), _read("CMakeLists.txt")
    assert 'read_flags("cxx")' in setup and 'read_flags("nvcc")' in setup
    assert "llmopt_read_flags(cxx" in cmake and "llmopt_read_flags(nvcc" in cmake
    code_setup = "\n".join(ln for ln in setup.splitlines() if not ln.lstrip().startswith("#"))
    code_cmake = "\n".join(ln for ln in cmake.splitlines() if not ln.lstrip().startswith("#"))
    for flag in set(_flags("cxx")) | set(_flags("nvcc")):
        pattern = re.escape(flag) + r"(?![\w=-])"
        assert not re.search(pattern, code_setup), f"setup.py repeats {flag}"
        assert not re.search(pattern, code_cmake), f"CMakeLists.txt repeats {flag}"


def test_setup_reads_the_same_list_as_the_file():
    # setup.py's reader, executed on its own (importing setup.py would run setup())
    src = _read("setup.py")
    fn = src[src.index("def read_flags("):src.index("def _rel(")]
    scope = {"os": os, "ROOT": ROOT}
    exec(fn, scope)  # noqa: S102 - our own build file
    assert scope["read_flags"]("cxx") == _flags("cxx")
    assert scope["read_flags"]("nvcc") == _flags("nvcc")
