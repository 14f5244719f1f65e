"""The benchmark report (bench.harness.Results plot specs -> bench.report PNGs + REPORT.md)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from bench import report
from bench.harness import Results


def _results(name: str) -> Results:
    res = Results(name, torch.device("cpu"), title=f"{name} title")
    res.notes.append("a note")
    res.add(op="dot", n=8, vs_loop=2.0, vs_foreach=0.5, GBps=10.0)
    res.add(op="axpby", n=8, vs_loop=float("nan"), vs_foreach="", GBps=12.5)
    res.add(op="axpby", n=64, vs_loop=0.0, vs_foreach=1.5, GBps=20.0)
    res.plot(["vs_loop", "vs_foreach"], label=["op", "n"])
    res.plot(["GBps"], label=["op", "n"], kind="value", limits=[(25.0, "copy")], where={"n": [64]})
    res.plot(["missing_column"], label=["op"])  # nothing to draw: no image, no crash
    res.curve("adamw", [1, 2, 3], [3.0, 2.0, 1.5], title="loss", xlabel="step", ylabel="loss")
    return res


def test_plot_spec_is_validated():
    with pytest.raises(ValueError, match="unknown plot kind"):
        Results("x", torch.device("cpu")).plot(["a"], label=["b"], kind="pie")


def test_plot_rows_keep_zero_values_and_apply_where():
    res = _results("rows")
    ratio, value = res.plots[0], res.plots[1]
    # the NaN / '' row has no number for the ratio chart; the 0.0 ratio row stays (its vs_foreach)
    assert [(r["op"], r["n"]) for r in report.plot_rows(ratio, res.rows)] == [("dot", 8), ("axpby", 64)]
    assert [(r["op"], r["n"]) for r in report.plot_rows(value, res.rows)] == [("axpby", 64)]
    zero = dict(value, where={})
    rows = [dict(op="a", n=1, GBps=0.0), dict(op="b", n=1, GBps="")]
    assert report.plot_rows(zero, rows) == rows[:1]  # 0 is a value (exact match 0 is a result)


def test_report_from_json_has_tables_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    for name in ("first", "second"):
        _results(name).write(str(tmp_path))
    path = report.write_report(str(tmp_path), ["second", "first"], header="header line")
    text = open(path).read()
    assert text.index("## second title") < text.index("## first title")  # the order asked for
    assert "header line" in text and "- a note" in text
    assert "| op | n | vs_loop | vs_foreach | GBps |" in text
    # two bar charts and one curve plot per benchmark; the empty spec makes no file
    for name in ("first", "second"):
        for i in range(4):
            exists = os.path.exists(tmp_path / "plots" / f"{name}_{i}.png")
            assert exists == (i != 2), (name, i)
            assert (f"(plots/{name}_{i}.png)" in text) == (i != 2)
    png = (tmp_path / "plots" / "first_0.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_report_cli_rerenders_a_directory(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _results("only").write(str(tmp_path))
    data = json.loads((tmp_path / "only.json").read_text())
    assert math.isnan(data["rows"][1]["vs_loop"]) and data["curves"]["adamw"]["y"] == [3.0, 2.0, 1.5]
    assert report.main([str(tmp_path)]) == 0
    assert "REPORT.md" in capsys.readouterr().out
    assert (tmp_path / "plots" / "only_3.png").exists()
    assert report.main([str(tmp_path / "empty")]) == 2


def test_report_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    _results("solo").write(str(tmp_path))
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    text = open(report.write_report(str(tmp_path))).read()
    assert "matplotlib is not installed" in text and "| op | n |" in text and "![" not in text


def test_goal_summary_counts_and_names_missed_rows(tmp_path):
    res = Results("goals", torch.device("cpu"), title="Goal title")
    res.add(op="dot", dtype="bfloat16", tensors=8, vs_loop=0.9, meets_vs_loop=False, meets_goal1=True)
    res.add(op="axpby", dtype="float32", tensors=512, vs_loop=1.7, meets_vs_loop=True, meets_goal1=True)
    res.add(op="norm", dtype="float32", tensors=8, vs_loop=1.7)  # not judged: no goal columns
    res.write(str(tmp_path))
    text = open(report.write_report(str(tmp_path), ["goals"])).read()
    assert "| Goal title | vs_loop | 1/2 | dot bfloat16 8 |" in text
    assert "| Goal title | goal1 | 2/2 | - |" in text
    assert text.index("## Goals") < text.index("## Goal title")
    assert report.goal_summary([("t", [dict(op="a", x=1.0)], [])]) == ""
    keyed = [dict(op="a", p=0.1, meets_x=False), dict(op="a", p=0.0, meets_x=True)]
    assert "| t | x | 1/2 | op=a p=0.1 |" in report.goal_summary([("t", keyed, ["op", "p"])])
