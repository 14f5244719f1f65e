"""Combined benchmark report: one markdown file with every benchmark's tables and PNG plots.

    python -m bench.report bench/results/<device>-<commit>     # re-render from the JSON files

``bench.run_all`` calls :func:`write_report` after running the benchmarks. Each benchmark's
JSON carries its rows and the plots it asked for (``Results.plot`` / ``Results.curve``):

- ratio plots: horizontal grouped bars on a log axis, one group per row, a line at 1
  (parity); a bar right of the line means llmopt_ext is faster than that baseline;
- value plots: linear bars (GB/s, TFLOP/s, loss) with a vertical line per device limit
  (measured copy bandwidth or matmul throughput, datasheet peak on known GPUs);
- curves: line plots (loss against step).

Before the sections, a goal table: for every ``meets_*`` column a benchmark writes (a goal of
the performance issue judged per row, in the same run), how many rows meet it and which miss.

PNGs go to ``<dir>/plots/``. Without matplotlib the report is written without plots and says so.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

from .harness import markdown_section


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) or math.isinf(v) else float(v)


def _selected(rows: list[dict], where: dict) -> list[dict]:
    def keep(r):
        for col, want in where.items():
            allowed = want if isinstance(want, list) else [want]
            if r.get(col) not in allowed:
                return False
        return True
    return [r for r in rows if keep(r)]


def plot_rows(spec: dict, rows: list[dict]) -> list[dict]:
    """The rows a bar chart shows: those ``where`` selects with a number in some y column
    (0 counts; a ratio chart then leaves out its non-positive bars, which a log axis cannot show)."""
    return [r for r in _selected(rows, spec["where"]) if any(_number(r.get(y)) is not None for y in spec["y"])]


def _bars(plt, spec: dict, rows: list[dict], title: str, path: str) -> bool:
    rows = plot_rows(spec, rows)
    if not rows:
        return False
    ys, ratio = spec["y"], spec["kind"] == "ratio"
    labels = [" ".join(str(r.get(c, "")) for c in spec["label"]) for r in rows]
    height = 0.8 / len(ys)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * len(rows) * max(1.0, 0.6 * len(ys))))
    for j, y in enumerate(ys):
        pos = [i + (j - (len(ys) - 1) / 2) * height for i in range(len(rows))]
        vals = [_number(r.get(y)) for r in rows]
        keep = [(p, v) for p, v in zip(pos, vals) if v is not None and (v > 0 or not ratio)]
        if not keep:
            continue
        bars = ax.barh([p for p, _ in keep], [v for _, v in keep], height=height * 0.95, label=y)
        ax.bar_label(bars, labels=[f"{v:.2f}x" if ratio else f"{v:.3g}" for _, v in keep], fontsize=6,
                     padding=2)
    if ratio:
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(spec["xlabel"] or "speed-up: baseline time / llmopt_ext time (log; >1 = faster)")
    else:
        ax.set_xlabel(spec["xlabel"])
    for k, (value, name) in enumerate(spec["limits"]):
        ax.axvline(value, color=f"C{k + len(ys)}", linestyle="--", linewidth=1.0, label=f"{name}: {value:.3g}")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.margins(x=0.15)
    ax.set_title(spec["title"] or title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _curves(plt, spec: dict, curves: dict, title: str, path: str) -> bool:
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, c) in enumerate(curves.items()):  # 10 colours, then the next line style
        ax.plot(c["x"], c["y"], label=name, linewidth=1.0, linestyle=("-", "--", ":")[i // 10 % 3])
    ax.set_xlabel(spec["xlabel"])
    ax.set_ylabel(spec["ylabel"])
    ax.set_yscale("log")
    ax.set_title(spec["title"] or title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(data: dict, plot_dir: str) -> list[tuple[str, str]]:
    """PNG files for one benchmark's JSON; returns (alt text, path relative to the report)."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return []
    os.makedirs(plot_dir, exist_ok=True)
    name, title = data["meta"]["name"], data.get("title") or data["meta"]["name"]
    images = []
    for i, spec in enumerate(data.get("plots", [])):
        file = f"{name}_{i}.png"
        path = os.path.join(plot_dir, file)
        if spec["kind"] == "curves":
            made = _curves(plt, spec, data.get("curves", {}), title, path)
        else:
            made = _bars(plt, spec, data["rows"], title, path)
        if made:
            images.append((spec["title"] or title, f"{os.path.basename(plot_dir)}/{file}"))
    return images


def _row_label(row: dict, key: list[str]) -> str:
    """A row's ``key`` columns (default: its strings and ints, not flags), joined."""
    if key:
        return " ".join(f"{k}={row[k]}" for k in key if k in row)
    parts = [str(v) for v in row.values()
             if isinstance(v, str) and v or isinstance(v, int) and not isinstance(v, bool)]
    return " ".join(parts[:6])


def goal_summary(tables: list[tuple[str, list[dict], list[str]]]) -> str:
    """A markdown table of every ``meets_*`` column of every benchmark: rows met / rows
    measured, and the rows that missed, labelled by the (title, rows, key) entry's key columns."""
    lines = []
    for title, rows, key in tables:
        goals = []
        for r in rows:
            goals += [k for k in r if k.startswith("meets_") and k not in goals]
        for goal in goals:
            judged = [r for r in rows if isinstance(r.get(goal), bool)]
            missed = [_row_label(r, key) for r in judged if not r[goal]]
            lines.append(f"| {title} | {goal[len('meets_'):]} | {len(judged) - len(missed)}/{len(judged)} | "
                         + ("; ".join(missed) if missed else "-") + " |")
    if not lines:
        return ""
    return ("## Goals: rows that meet each goal (same-run ratios)\n\n"
            "| benchmark | goal | met | missed rows |\n|---|---|---|---|\n" + "\n".join(lines) + "\n")


def write_report(out_dir: str, names: list[str] | None = None, header: str = "") -> str:
    """Writes <out_dir>/REPORT.md (and plots/) from <out_dir>/<name>.json, in ``names`` order."""
    paths = [os.path.join(out_dir, f"{n}.json") for n in names] if names is not None else \
        sorted(glob.glob(os.path.join(out_dir, "*.json")))
    sections = []
    tables = []
    have_mpl = True
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        have_mpl = False
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        meta = data["meta"]
        images = render(data, os.path.join(out_dir, "plots"))
        tables.append((data.get("title") or meta["name"], data["rows"], data.get("key", [])))
        sections.append(markdown_section(data.get("title") or meta["name"],
                                         f"{meta['device']}; torch {meta['torch']}; commit {meta['commit']}",
                                         meta["notes"], data["rows"], images))
    if not header and paths:
        with open(paths[0]) as f:
            meta = json.load(f)["meta"]
        header = f"Device: {meta['device']}; torch {meta['torch']}; commit {meta['commit']}."
    text = "# llmopt_ext benchmarks\n\n" + header + "\n"
    if not have_mpl:
        text += "\n(matplotlib is not installed: tables only, no plots.)\n"
    summary = goal_summary(tables)
    if summary:
        text += "\n" + summary
    report = os.path.join(out_dir, "REPORT.md")
    with open(report, "w") as f:
        f.write(text + "\n" + "\n".join(sections))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="a bench/results/<device>-<commit> directory")
    args = p.parse_args(argv)
    if not glob.glob(os.path.join(args.directory, "*.json")):
        print(f"no benchmark JSON files in {args.directory}", file=sys.stderr)
        return 2
    print("report:", write_report(args.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
