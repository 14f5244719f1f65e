"""Runs every bench/bench_*.py and writes one report.

    python -m bench.run_all [--quick] [--device cpu|cuda]

Each benchmark module exposes ``run(device, quick) -> list[Results]``. Results go to
``bench/results/<device>-<commit>/``: a JSON and a markdown file per benchmark, and one
``REPORT.md`` with every table and the PNG plots under ``plots/`` (``bench.report``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time

import torch

from .harness import RESULTS_DIR, Results, commit, device_name, device_tag
from .report import write_report

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([BENCH_DIR]) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="*", help="benchmark module names (default: all)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out_dir = os.path.join(RESULTS_DIR, f"{device_tag(device)}-{commit()}" + ("-quick" if args.quick else ""))
    header = (f"Device: {device_name(device)}; torch {torch.__version__}; commit {commit()}"
              f"{' (quick sizes)' if args.quick else ''}. Command: `python -m bench.run_all"
              f"{' --quick' if args.quick else ''}`.")
    names = []
    failed = []
    for name in args.only or modules():
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            results: list[Results] = importlib.import_module(f"bench.{name}").run(device, args.quick)
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            failed.append(name)
            print(f"   FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        for r in results:
            r.write(out_dir)
            names.append(r.name)
        print(f"   done in {time.perf_counter() - t0:.1f} s", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    report = write_report(out_dir, names, header)
    print(f"report: {report}")
    if failed:
        print(f"failed benchmarks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
