"""The peft-suite comparison (tests/peft_suite/compare.py): a test that fails only with the
fused layer, or that the fused pass did not run, fails the suite unless listed with a reason."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "peft_suite"))
import compare  # noqa: E402
import peft_suite_plugin  # noqa: E402


def _junit(path: Path, cases: dict[str, str]) -> str:
    body = []
    for test_id, outcome in cases.items():
        cls, name = test_id.split("::")
        inner = {"passed": "", "failed": "<failure message='x'/>", "error": "<error message='x'/>",
                 "skipped": "<skipped message='x'/>"}[outcome]
        body.append(f"<testcase classname='{cls}' name='{name}' time='0.1'>{inner}</testcase>")
    path.write_text(f"<testsuites><testsuite name='pytest'>{''.join(body)}</testsuite></testsuites>")
    return str(path)


def _run(tmp_path, plain, fused, expected=""):
    (tmp_path / "expected.txt").write_text(expected)
    (tmp_path / "cov.json").write_text(json.dumps({
        "fused_calls": {"1 adapter": 5}, "fallback_calls": {"merged adapters": 2}, "fused_layers_built": 3,
        "tests": {"built_fused_layer": 2, "ran_fused_op": 1, "only_fell_back": 1, "built_but_no_forward": 0}}))
    rc = compare.main([_junit(tmp_path / "p.xml", plain), _junit(tmp_path / "f.xml", fused),
                       str(tmp_path / "cov.json"), str(tmp_path / "summary"), str(tmp_path / "expected.txt")])
    return rc, json.loads((tmp_path / "summary.json").read_text())


def test_fused_only_failure_fails_the_suite(tmp_path):
    plain = {"t.A::ok": "passed", "t.A::both_fail": "failed", "t.A::regress": "passed", "t.A::skip": "skipped",
             "t.A::gone": "passed"}
    fused = {"t.A::ok": "passed", "t.A::both_fail": "failed", "t.A::regress": "error", "t.A::skip": "skipped"}
    rc, s = _run(tmp_path, plain, fused)
    assert rc == 1
    assert s["fused_only_failures"] == ["t.A::regress"] and s["missing_from_fused"] == ["t.A::gone"]
    assert s["counts"]["plain"] == {"passed": 3, "failed": 1, "skipped": 1}
    md = (tmp_path / "summary.md").read_text()
    assert "UNEXPECTED t.A::regress" in md and "| fused: 1 adapter | 5 |" in md


def test_listed_difference_passes_and_same_outcomes_pass(tmp_path):
    plain = {"t.A::ok": "passed", "t.A::msg": "passed"}
    fused = {"t.A::ok": "passed", "t.A::msg": "failed"}
    rc, s = _run(tmp_path, plain, fused, "t.A::ms*  # the message names the class\n")
    assert rc == 0 and s["expected_differences"] == ["t.A::msg"] and s["unexpected"] == []
    with pytest.raises(SystemExit, match="no reason"):
        _run(tmp_path, plain, fused, "t.A::msg\n")


def test_deselect_lines_need_a_reason(tmp_path):
    f = tmp_path / "deselect.txt"
    f.write_text("# comment\ntests/a.py::test_x  # hub download\n\n")
    assert peft_suite_plugin.read_globs(str(f), True) == ["tests/a.py::test_x"]
    f.write_text("tests/a.py::test_y\n")
    with pytest.raises(pytest.UsageError, match="gives no reason"):
        peft_suite_plugin.read_globs(str(f), True)
    assert peft_suite_plugin.read_globs(str(f), False) == ["tests/a.py::test_y"]
