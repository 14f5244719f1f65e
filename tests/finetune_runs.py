"""A CLI fine-tuning run inside the test process (stdout swallowed, torch's thread count
restored), shared by the tests that check an optimizer's CLI defaults."""
from __future__ import annotations

import contextlib
import io

import torch


def run_cli(tmp_path, optimizer: str, argv: list[str], threads: int = 1) -> dict:
    """``llmopt-finetune --optimizer optimizer *argv`` into tmp_path/o; its results dict."""
    from llmopt_ext.finetune.cli import build_parser
    from llmopt_ext.finetune.train import run
    args = build_parser().parse_args(["--output-dir", str(tmp_path / "o"), "--no-progress",
                                      "--threads", str(threads), "--optimizer", optimizer, *argv])
    n = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return run(args)
    finally:
        torch.set_num_threads(n)
