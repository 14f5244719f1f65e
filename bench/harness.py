"""Benchmark harness shared by every bench/bench_*.py.

- ``measure(fn, device)``: median (and 20th/80th percentiles) of repeated runs; GPU timing
  with CUDA events after a synchronize (or triton.testing.do_bench when available), never
  wall-clock around an unsynchronised launch.
- ``copy_bandwidth(device)``: measured device copy bandwidth (GB/s), the roofline the
  memory-bound ops are reported against.
- ``Results``: rows of one benchmark, written as JSON and a markdown table under
  ``bench/results/<device>-<commit>/``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "nogit"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def device_tag(device: torch.device) -> str:
    """Short file-name tag: 'cpu-2t' or e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.type == "cuda":
        return "-".join(torch.cuda.get_device_name(device).lower().replace("nvidia", "nvidia ").split())
    return f"cpu-{torch.get_num_threads()}t"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, min_reps: int = 5, max_reps: int = 50,
            min_time_s: float = 0.3, warmup: int = 2) -> dict:
    """Times fn() repeatedly; returns {'ms': median, 'p20_ms', 'p80_ms', 'reps'}."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start_all < min_time_s):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    return {"ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1], "reps": len(times)}


_BW_CACHE: dict[str, float] = {}


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Measured copy bandwidth in GB/s (bytes read + bytes written per second)."""
    key = str(device)
    if key not in _BW_CACHE:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        t = measure(lambda: dst.copy_(src), device, min_reps=5, max_reps=20)
        _BW_CACHE[key] = 2 * nbytes / (t["ms"] * 1e-3) / 1e9
    return _BW_CACHE[key]


@dataclass
class Results:
    """Rows of one benchmark; write() saves <name>.json and <name>.md."""

    name: str
    device: torch.device
    title: str = ""
    notes: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)

    def out_dir(self) -> str:
        return os.path.join(RESULTS_DIR, f"{device_tag(self.device)}-{commit()}")

    def markdown(self) -> str:
        lines = [f"## {self.title or self.name}", "", f"Device: {device_name(self.device)}; "
                 f"torch {torch.__version__}; commit {commit()}.", ""]
        lines += [f"- {n}" for n in self.notes]
        if self.notes:
            lines.append("")
        if self.rows:
            cols = list(self.rows[0].keys())
            for r in self.rows[1:]:
                cols += [k for k in r if k not in cols]
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            for r in self.rows:
                lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | None = None) -> str:
        out_dir = out_dir or self.out_dir()
        os.makedirs(out_dir, exist_ok=True)
        meta = {"name": self.name, "device": device_name(self.device), "torch": torch.__version__,
                "commit": commit(), "notes": self.notes}
        with open(os.path.join(out_dir, f"{self.name}.json"), "w") as f:
            json.dump({"meta": meta, "rows": self.rows}, f, indent=1)
        path = os.path.join(out_dir, f"{self.name}.md")
        with open(path, "w") as f:
            f.write(self.markdown())
        return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def main(run: Callable[[torch.device, bool], list[Results]], doc: str | None) -> None:
    """Command line of one bench module: ``python -m bench.bench_x [--quick] [--device D]``."""
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    for r in run(torch.device(args.device), args.quick):
        print(r.markdown())
        print("written:", r.write())
