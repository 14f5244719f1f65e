"""HyperAdamW: AdamW with a hypergradient-adapted step size and no learning rate.

Against torch's AdamW when the adaptation is switched off, the direction of the adaptation on
problems whose right step size is known, no lr by construction (class and CLI), state_dict /
resume (also in test_optim_reliability's cross-optimizer tests), DDP with 2 gloo processes,
and the CLI defaults on the embedded model and the real one (eval loss falls, 2 seeds)."""
from __future__ import annotations

import math

import pytest
import torch

from llmopt_ext.optim import HyperAdamW

from ddp_runs import run_two_ranks
from finetune_runs import run_cli


def _quadratic(n=20, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(n, generator=g))
    target = torch.randn(n, generator=g)
    return w, lambda: scale * 0.5 * ((w - target) ** 2).sum()


def _steps(opt, w, loss_fn, n):
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_without_adaptation_it_is_torch_adamw_at_init_step(wd):
    """rate -> 0 freezes s at init_step: the trajectory is torch.optim.AdamW's with lr=init_step
    (the same math; the rounding order differs, so allclose, not equal)."""
    torch.manual_seed(0)
    m1 = torch.nn.Linear(7, 5)
    m2 = torch.nn.Linear(7, 5)
    m2.load_state_dict(m1.state_dict())
    o1 = HyperAdamW(m1.parameters(), weight_decay=wd, rate=1e-30, init_step=1e-2)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=wd, foreach=False)
    x, y = torch.randn(32, 7), torch.randn(32, 5)
    for _ in range(25):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    # the parameters moved by up to 25 * 1e-2; 1e-5 is ~4e-5 of that (float32 rounding of
    # s = exp(log 1e-2) and of the bias corrections, taken in another order)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert o1.step_size == pytest.approx(1e-2, rel=1e-6)


def test_step_grows_when_too_small_and_shrinks_when_too_large():
    w, f = _quadratic()          # the minimum ~1.4 away per coordinate
    small = HyperAdamW([w], init_step=1e-5)
    _steps(small, w, f, 30)
    assert small.step_size > 1e-3          # gradients kept pointing along the steps
    # the rule itself: the minimum 0.01 away, the first step (0.5 per coordinate) overshoots,
    # the next gradient points straight back (cosine -1): s <- s * exp(-rate)
    w = torch.nn.Parameter(torch.zeros(20))
    near = torch.full((20,), 0.01)
    big = HyperAdamW([w], init_step=0.5, rate=0.4)
    _steps(big, w, lambda: 0.5 * ((w - near) ** 2).sum(), 2)
    assert big.step_size == pytest.approx(0.5 * math.exp(-0.4), rel=1e-5)
    # ... and far from it, the next gradient points along the step (cosine +1)
    w = torch.nn.Parameter(torch.zeros(20))
    far = torch.full((20,), 10.0)
    grow = HyperAdamW([w], init_step=0.5, rate=0.4)
    _steps(grow, w, lambda: 0.5 * ((w - far) ** 2).sum(), 2)
    assert grow.step_size == pytest.approx(0.5 * math.exp(0.4), rel=1e-5)


@pytest.mark.parametrize("init_step", [1e-4, 1e-3, 1e-2])
def test_converges_on_a_quadratic_from_any_init_step(init_step):
    w, f = _quadratic()
    losses = _steps(HyperAdamW([w], init_step=init_step), w, f, 300)
    assert losses[-1] < 1e-3 * losses[0]


def test_invariant_to_the_scale_of_the_loss():
    """The cosine signal and Adam's direction ignore a constant factor on the loss: the same
    trajectory up to eps and rounding."""
    w1, f1 = _quadratic(scale=1.0)
    w2, f2 = _quadratic(scale=1000.0)
    o1, o2 = HyperAdamW([w1], eps=0.0), HyperAdamW([w2], eps=0.0)
    _steps(o1, w1, f1, 40)
    _steps(o2, w2, f2, 40)
    torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-5)
    assert o1.step_size == pytest.approx(o2.step_size, rel=1e-4)


def test_no_learning_rate_by_construction():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError):
        HyperAdamW([w], lr=1e-3)  # there is no such argument
    from llmopt_ext.finetune.cli import parse_args
    from llmopt_ext.finetune.optimizers import UsageError, check_optimizer_options
    from llmopt_ext.finetune.train import resolve_options
    from llmopt_ext.optim import driver
    assert driver.lr_free(HyperAdamW) and driver.lr_schedulable(HyperAdamW([w]))
    with pytest.raises(UsageError, match="no learning rate"):
        check_optimizer_options(resolve_options(parse_args(["--optimizer", "hyperadamw",
                                                            "--lr", "1e-3"])))


@pytest.mark.parametrize("bad", [dict(rate=0.0), dict(init_step=-1.0), dict(rate=math.nan),
                                 dict(init_step=2.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0),
                                 dict(weight_decay=-0.1)])
def test_bad_hyperparameters_are_rejected(bad):
    with pytest.raises(ValueError):
        HyperAdamW([torch.nn.Parameter(torch.zeros(2))], **bad)


def test_a_schedule_scales_the_step():
    w1, f1 = _quadratic()
    w2, f2 = _quadratic()
    o1, o2 = HyperAdamW([w1]), HyperAdamW([w2])
    sched = torch.optim.lr_scheduler.LambdaLR(o2, lambda t: 0.5)
    for o, w, f in ((o1, w1, f1), (o2, w2, f2)):
        o.zero_grad()
        f().backward()
        o.step()
    start = _quadratic()[0]
    torch.testing.assert_close((w2 - start) * 2, w1 - start)
    del sched


def test_state_dict_round_trip_keeps_the_step_size_and_resumes_identically():
    w, f = _quadratic()
    opt = HyperAdamW([w], init_step=1e-4)
    _steps(opt, w, f, 10)
    sd = opt.state_dict()
    assert float(torch.as_tensor(sd["hyper"]["log_step"]).exp()) == pytest.approx(opt.step_size)
    w2, f2 = _quadratic()
    with torch.no_grad():
        w2.copy_(w)
    opt2 = HyperAdamW([w2], init_step=1e-2)   # the loaded state, not the constructor, decides
    opt2.load_state_dict(sd)
    assert _steps(opt, w, f, 5) == _steps(opt2, w2, f2, 5)
    assert torch.equal(w, w2) and opt.step_size == opt2.step_size
    with pytest.raises(ValueError, match="hyper"):
        HyperAdamW([torch.nn.Parameter(torch.zeros(20))]).load_state_dict(
            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(20))], lr=1e-3).state_dict())


# ---------------------------------------------------------------------------- DDP

def _ddp_train(rank):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = HyperAdamW(ddp.parameters(), weight_decay=0.01)
    g = torch.Generator().manual_seed(10 + rank)  # different data per rank
    for _ in range(6):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return {"params": [p.detach() for p in model.parameters()], "s": opt.step_size}


def test_ddp_two_gloo_processes_stay_identical_and_match_one_process():
    r0, r1 = run_two_ranks(_ddp_train)
    assert r0["s"] == r1["s"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    # one process on the mean of both ranks' losses (= DDP's averaged gradient)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = HyperAdamW(model.parameters(), weight_decay=0.01)
    gens = [torch.Generator().manual_seed(10 + r) for r in (0, 1)]
    for _ in range(6):
        batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
                   for g in gens]
        opt.zero_grad()
        sum(torch.nn.functional.cross_entropy(model(x), y) for x, y in batches).div(2).backward()
        opt.step()
    for a, b in zip(model.parameters(), r0["params"]):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
    assert opt.step_size == pytest.approx(r0["s"], rel=1e-5)


# ---------------------------------------------------------------------------- the CLI defaults

def _cli(tmp_path, argv):
    return run_cli(tmp_path, "hyperadamw", argv, threads=2)


@pytest.mark.parametrize("seed", [0, 1])
def test_cli_defaults_learn_on_the_embedded_model(tmp_path, seed):
    r = _cli(tmp_path, ["--train-size", "400", "--eval-size", "32", "--em-samples", "2",
                        "--max-new-tokens", "4", "--batch-size", "8", "--max-steps", "40",
                        "--seed", str(seed)])
    assert r["after"]["eval_loss"] < 0.8 * r["before"]["eval_loss"]


@pytest.mark.parametrize("seed", [0, 1])
def test_cli_defaults_learn_on_the_real_model(tmp_path, real_model_dir, seed):
    r = _cli(tmp_path, ["--model", real_model_dir, "--train-size", "32", "--eval-size", "6",
                        "--em-samples", "1", "--max-new-tokens", "1", "--batch-size", "2",
                        "--max-length", "48", "--max-steps", "6", "--seed", str(seed)])
    assert r["after"]["eval_loss"] < r["before"]["eval_loss"]
