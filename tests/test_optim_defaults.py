"""Every project optimizer at its CLI defaults, on the embedded model and on the real one
(SmolLM2-135M-Instruct), two seeds: the eval loss after a short run is below the loss
before it (no divergence at defaults), except where measured otherwise
(KNOWN_DIVERGENT_ON_REAL). The learning-rate-free ones refuse ``--lr`` and have no ``lr``
argument: their claim holds by construction.

Short runs: these check that a default does not blow up on a model it was not tuned on,
not how well it trains (``bench/bench_finetune.py`` measures that)."""
from __future__ import annotations

import inspect

import pytest

from finetune_runs import run_cli

PROJECT = ("sf-width", "hyperadamw", "golore", "sophiag", "sophiah", "adahessian", "oasis", "aisarah", "trcg")
LR_FREE = ("sf-width", "hyperadamw", "aisarah", "trcg")


def _run(tmp_path, opt, argv):
    return run_cli(tmp_path, opt, argv)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("opt", PROJECT)
def test_defaults_learn_on_the_embedded_model(tmp_path, opt, seed):
    r = _run(tmp_path, opt, ["--train-size", "400", "--eval-size", "32", "--em-samples", "1",
                             "--max-new-tokens", "2", "--batch-size", "8", "--max-steps", "30",
                             "--seed", str(seed)])
    assert r["after"]["eval_loss"] < r["before"]["eval_loss"], (r["before"], r["after"])


# Measured and not fixed: AdaHessian's default lr (0.15, the paper's) diverges on the real
# model. Seed 0 diverged on both CPUs measured (8 steps: 3.11 -> 3.43 on an Intel Xeon, 3.11 ->
# 3.28 on an AMD EPYC): strict, so the test turns red the day it stops diverging and this list
# and the README stay true. Seed 1 diverged on the Xeon (2.24 -> 5.14) but learned on the EPYC
# (2.24 -> 1.51): eight steps at that rate are chaotic enough for the CPU's rounding to decide,
# so that case is an xfail that may pass.
KNOWN_DIVERGENT_ON_REAL = {("adahessian", 0): True, ("adahessian", 1): False}   # -> strict
_DIVERGENT_REASON = "default lr 0.15 diverges on SmolLM2-135M (measured)"


def _real_params():
    for opt in PROJECT:
        if opt == "hyperadamw":  # test_hyperadam.py runs it
            continue
        for seed in (0, 1):
            strict = KNOWN_DIVERGENT_ON_REAL.get((opt, seed))
            marks = [] if strict is None else \
                [pytest.mark.xfail(strict=strict, reason=_DIVERGENT_REASON)]
            yield pytest.param(opt, seed, marks=marks, id=f"{opt}-{seed}")


@pytest.mark.parametrize("opt,seed", list(_real_params()))
def test_defaults_do_not_diverge_on_the_real_model(tmp_path, real_model_dir, opt, seed):
    r = _run(tmp_path, opt, ["--model", real_model_dir, "--train-size", "32", "--eval-size", "4",
                             "--em-samples", "1", "--max-new-tokens", "1", "--batch-size", "2",
                             "--max-length", "48", "--max-steps", "8", "--seed", str(seed)])
    assert r["after"]["eval_loss"] < r["before"]["eval_loss"], (r["before"], r["after"])


@pytest.mark.parametrize("opt", LR_FREE)
def test_lr_free_by_construction(opt):
    from llmopt_ext.finetune.cli import parse_args
    from llmopt_ext.finetune.optimizers import UsageError, check_optimizer_options, optimizer_class
    from llmopt_ext.finetune.train import resolve_options
    from llmopt_ext.optim import driver
    cls = optimizer_class(opt)
    assert driver.lr_free(cls) and driver.default_lr(cls) is None
    assert "lr" not in inspect.signature(cls.__init__).parameters, f"{cls.__name__} takes an lr"
    with pytest.raises(UsageError, match="no learning rate"):
        check_optimizer_options(resolve_options(parse_args(["--optimizer", opt, "--lr", "1e-3"])))
