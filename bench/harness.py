"""Benchmark harness shared by every bench/bench_*.py.

- ``measure(fn, device)``: median (and 20th/80th percentiles) of repeated runs. GPU timing
  uses triton.testing.do_bench when triton is importable (CUDA events, L2 flushed before
  every repetition), else CUDA events around each call after zeroing a 256 MiB buffer (the
  same flush): 128 LoRA tensors fit in an H100's 50 MB L2, and a memory-bound op timed
  with a warm L2 reads from cache, not HBM. Never wall-clock around an unsynchronised launch.
- ``copy_bandwidth(device)``: measured device copy bandwidth (GB/s), the roofline the
  memory-bound ops are reported against.
- ``matmul_throughput(device, dtype)``: measured TFLOP/s of one large matmul, the compute
  roofline the GEMM-bound ops are reported against (with the datasheet peak on known GPUs,
  ``datasheet_limits``).
- ``Results``: rows of one benchmark, written as JSON and a markdown table under
  ``bench/results/<device>-<commit>/``, plus plot specifications that ``bench.report``
  renders to PNG.
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
    if device.type == "cuda":
        return _measure_cuda(fn, device, min_reps=min_reps, max_reps=max_reps, min_time_s=min_time_s,
                             warmup=warmup)
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start_all < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [min(times)] * 4
    return {"ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1], "reps": len(times)}


_L2_FLUSH_BYTES = 256 << 20  # > every current GPU's L2 (H100 50 MB, H200 60 MB, B200 126 MB)
_FLUSH_BUFFERS: dict[str, torch.Tensor] = {}


def _measure_cuda(fn, device, *, min_reps, max_reps, min_time_s, warmup) -> dict:
    try:
        from triton.testing import do_bench  # noqa: PLC0415 - optional dependency
    except ImportError:
        do_bench = None
    if do_bench is not None:
        # do_bench sizes its repetitions from a time budget in ms; it flushes L2 itself.
        q20, q50, q80 = do_bench(fn, warmup=max(1, warmup) * 5, rep=int(min_time_s * 1e3),
                                 quantiles=[0.2, 0.5, 0.8])
        return {"ms": q50, "p20_ms": q20, "p80_ms": q80, "reps": None}  # do_bench picks the count
    key = str(device)
    if key not in _FLUSH_BUFFERS:
        _FLUSH_BUFFERS[key] = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    flush = _FLUSH_BUFFERS[key]
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start_all < min_time_s):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return _summary(times)


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


_MM_CACHE: dict[tuple[str, torch.dtype], float] = {}


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run on native units: always on CUDA; on CPU only where oneDNN has
    a bf16 kernel (AVX512-BF16 / AMX). Elsewhere (e.g. AVX2-only x86) a bf16 GEMM takes a
    reference path measured here at 0.3-2 GFLOP/s, 1000x slower than fp32, so a 4096-square
    bf16 matmul takes minutes."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def matmul_throughput(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured TFLOP/s of one square matmul: 8192 on GPU; on CPU the first size from 512 up
    to 4096 where one call takes >= 0.1 s (a CPU without native bf16 stops at 512 instead of
    spending minutes per call)."""
    key = (str(device), dtype)
    if key not in _MM_CACHE:
        sizes = [8192] if device.type == "cuda" else [512, 1024, 2048, 4096]
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            a @ b  # first call: kernel selection, allocation
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            if time.perf_counter() - t0 >= 0.1 or n == sizes[-1]:
                break
        t = measure(lambda: a @ b, device, min_reps=3, max_reps=20, warmup=0)
        _MM_CACHE[key] = 2 * n ** 3 / (t["ms"] * 1e-3) / 1e12
    return _MM_CACHE[key]


# Dense (no sparsity) datasheet peaks, SXM parts: (HBM TB/s, bf16 tensor-core TFLOP/s).
_DATASHEET = {"h100 80gb hbm3": (3.35, 989.0), "h100 pcie": (2.0, 756.0), "h200": (4.8, 989.0)}


def datasheet_limits(device: torch.device) -> dict[str, float]:
    """{'GBps': ..., 'TFLOPs': ...} from the vendor datasheet for known GPUs, else {}."""
    if device.type != "cuda":
        return {}
    name = torch.cuda.get_device_name(device).lower()
    for key, (tbs, tflops) in _DATASHEET.items():
        if key in name:
            return {"GBps": tbs * 1e3, "TFLOPs": tflops}
    return {}


def bandwidth_limits(device: torch.device) -> list[tuple[float, str]]:
    """Memory-bound roofline lines for plots: measured copy bandwidth, datasheet HBM peak."""
    limits = [(copy_bandwidth(device), "measured copy bandwidth")]
    if "GBps" in datasheet_limits(device):
        limits.append((datasheet_limits(device)["GBps"], "datasheet HBM bandwidth"))
    return limits


def matmul_limits(device: torch.device) -> list[tuple[float, str]]:
    """Compute-bound roofline lines for plots: measured bf16 matmul, datasheet dense bf16 peak."""
    limits = [(matmul_throughput(device), "measured bf16 matmul")]
    if "TFLOPs" in datasheet_limits(device):
        limits.append((datasheet_limits(device)["TFLOPs"], "datasheet bf16 dense"))
    return limits


@dataclass
class Results:
    """Rows of one benchmark; write() saves <name>.json (rows, notes, plot specs) and <name>.md."""

    name: str
    device: torch.device
    title: str = ""
    notes: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    plots: list[dict] = field(default_factory=list)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    key: list[str] = field(default_factory=list)  # columns that name a row (the goal table's labels)

    def add(self, **row) -> None:
        self.rows.append(row)

    def plot(self, y: list[str], *, label: list[str], kind: str = "ratio", title: str = "",
             where: dict | None = None, limits: list[tuple[float, str]] = (), xlabel: str = "") -> None:
        """Asks bench.report for a horizontal grouped bar chart: one group per row (filtered by
        ``where``: column -> value or list of values), labelled by the ``label`` columns, one bar
        per ``y`` column. kind='ratio' uses a log axis with a line at 1 (parity); kind='value'
        a linear axis with a vertical line per (value, label) in ``limits`` (device limits)."""
        if kind not in ("ratio", "value"):
            raise ValueError(f"unknown plot kind {kind!r}")
        self.plots.append(dict(kind=kind, y=list(y), label=list(label), title=title, where=where or {},
                               limits=[[float(v), str(n)] for v, n in limits], xlabel=xlabel))

    def curve(self, name: str, x: list[float], y: list[float], *, title: str = "", xlabel: str = "",
              ylabel: str = "") -> None:
        """A named line (e.g. a loss curve); all curves of one Results share one line plot."""
        self.curves[name] = {"x": [float(v) for v in x], "y": [float(v) for v in y]}
        if not any(p["kind"] == "curves" for p in self.plots):
            self.plots.append(dict(kind="curves", title=title, xlabel=xlabel, ylabel=ylabel))

    def out_dir(self) -> str:
        return os.path.join(RESULTS_DIR, f"{device_tag(self.device)}-{commit()}")

    def markdown(self) -> str:
        return markdown_section(self.title or self.name, f"{device_name(self.device)}; torch "
                                f"{torch.__version__}; commit {commit()}", self.notes, self.rows)

    def write(self, out_dir: str | None = None) -> str:
        out_dir = out_dir or self.out_dir()
        os.makedirs(out_dir, exist_ok=True)
        meta = {"name": self.name, "device": device_name(self.device), "torch": torch.__version__,
                "commit": commit(), "notes": self.notes}
        with open(os.path.join(out_dir, f"{self.name}.json"), "w") as f:
            json.dump({"meta": meta, "title": self.title, "rows": self.rows, "plots": self.plots,
                       "curves": self.curves, "key": self.key}, f, indent=1)
        path = os.path.join(out_dir, f"{self.name}.md")
        with open(path, "w") as f:
            f.write(self.markdown())
        return path


def markdown_section(title: str, where: str, notes: list[str], rows: list[dict], images=()) -> str:
    """One report section: title, where it ran, notes as bullets, plots, the rows as a table."""
    lines = [f"## {title}", "", f"Device: {where}.", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    for alt, path in images:
        lines += [f"![{alt}]({path})", ""]
    if rows:
        cols = list(rows[0].keys())
        for r in rows[1:]:
            cols += [k for k in r if k not in cols]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


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
