"""scripts/*.sh: every script parses (bash -n), and bootstrap.sh's choice of Python: PYTHON
when given, the active venv, else a .venv/ of the checkout's own, created once and reused (a
Debian/Ubuntu system Python refuses pip installs, PEP 668)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.sh")))
SYSTEM_PYTHON = "/usr/bin/python3"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"  # python3 on PATH is the system one
    env.update(extra)
    return env


def _venv_only(checkout, *args, **env):
    return subprocess.run(["bash", os.path.join(checkout, "scripts", "bootstrap.sh"), "--venv-only",
                           *args], env=_env(**env), capture_output=True, text=True, timeout=120)


@pytest.fixture
def checkout(tmp_path):
    os.makedirs(tmp_path / "scripts")
    shutil.copy(os.path.join(ROOT, "scripts", "bootstrap.sh"), tmp_path / "scripts")
    return str(tmp_path)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_python_given_or_venv_active_is_used_as_is(checkout):
    r = _venv_only(checkout, PYTHON="/opt/some/python")
    assert r.returncode == 0 and "/opt/some/python (PYTHON given)" in r.stdout
    r = _venv_only(checkout, VIRTUAL_ENV="/opt/env")
    assert r.returncode == 0 and "/opt/env/bin/python (active virtual environment)" in r.stdout
    assert not os.path.exists(os.path.join(checkout, ".venv"))


def test_dry_run_creates_nothing(checkout):
    r = _venv_only(checkout, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"-m venv --system-site-packages {checkout}/.venv" in r.stdout
    assert not os.path.exists(os.path.join(checkout, ".venv"))


def test_unknown_mode_fails(checkout):
    r = subprocess.run(["bash", os.path.join(checkout, "scripts", "bootstrap.sh"), "everything"],
                       env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown mode" in r.stderr


def _has_venv_module() -> bool:
    return os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import venv, ensurepip"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_venv_module(), reason="no /usr/bin/python3 with the venv module")
def test_creates_and_reuses_its_own_venv(checkout):
    r = _venv_only(checkout)
    assert r.returncode == 0, r.stderr
    py = os.path.join(checkout, ".venv", "bin", "python")
    assert "creating the virtual environment" in r.stdout and os.access(py, os.X_OK)
    # a venv: pip installs land there, not in the externally managed system Python
    out = subprocess.run([py, "-c", "import sys; print(sys.prefix != sys.base_prefix)"],
                         capture_output=True, text=True).stdout.strip()
    assert out == "True"
    r = _venv_only(checkout)
    assert r.returncode == 0 and "creating" not in r.stdout and f"python: {py}" in r.stdout
