"""WidthScheduleFree: Schedule-Free AdamW with the step size 1.28 / width and no learning rate.

Against the schedulefree package at the same step size (bit-identical in fp32), the width read
off the parameters, no lr by construction, eval()/train() exact and harmless mid-run, state_dict
(also in test_optim_reliability's cross-optimizer tests), DDP with 2 gloo processes, and the CLI
defaults on both models (test_optim_defaults)."""
from __future__ import annotations

import copy

import pytest
import torch

from llmopt_ext.optim import WidthScheduleFree
from llmopt_ext.optim.schedule_free import WIDTH_SCALE, infer_width

from ddp_runs import run_two_ranks


def _mlp(seed=0, widths=(8, 16, 4)):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(widths[0], widths[1]), torch.nn.Tanh(),
                               torch.nn.Linear(widths[1], widths[2]))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def _train(model, opt, x, y, n, eval_every=0):
    for t in range(n):
        opt.train()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if eval_every and t % eval_every == 0:
            opt.eval()
            with torch.no_grad():
                model(x)
    opt.eval()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("wd,warmup", [(0.0, 0), (0.01, 5)])
def test_bit_identical_to_the_schedulefree_package_at_the_same_step(wd, warmup):
    """The same equations in the same float32 order as schedulefree.AdamWScheduleFree (1.4.1):
    with lr = the rule's step size, every parameter of x after 40 steps is equal."""
    sf = pytest.importorskip("schedulefree")
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1 = WidthScheduleFree(m1.parameters(), weight_decay=wd, warmup_steps=warmup)
    o2 = sf.AdamWScheduleFree(m2.parameters(), lr=o1.step_size, weight_decay=wd,
                              warmup_steps=warmup)
    got = _train(m1, o1, x, y, 40)
    want = _train(m2, o2, x, y, 40)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_step_size_is_the_width_rule():
    """LoRA-shaped parameters of a width-576 model (SmolLM2-135M: hidden 576, kv 192,
    intermediate 1536): the width is the hidden size and the step 1.28 / 576."""
    r, h, kv, inter = 8, 576, 192, 1536
    shapes = [(r, h), (h, r), (r, h), (kv, r), (r, h), (kv, r), (r, h), (h, r),
              (r, h), (inter, r), (r, h), (inter, r), (r, inter), (h, r)]
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    assert infer_width(ps) == 576
    opt = WidthScheduleFree(ps)
    assert opt.width == 576 and opt.step_size == pytest.approx(WIDTH_SCALE / 576)
    assert WidthScheduleFree(ps, width=128).step_size == pytest.approx(1e-2)
    assert infer_width([torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(3))]) == 5
    with pytest.raises(ValueError, match="width"):
        WidthScheduleFree([torch.nn.Parameter(torch.zeros(0))])


def test_no_learning_rate_by_construction():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError):
        WidthScheduleFree([w], lr=1e-3)  # there is no such argument
    from llmopt_ext.optim import driver
    assert driver.lr_free(WidthScheduleFree) and not driver.lr_schedulable(WidthScheduleFree([w]))


@pytest.mark.parametrize("bad", [dict(betas=(0.0, 0.999)), dict(betas=(0.9, 1.0)), dict(eps=-1.0),
                                 dict(weight_decay=float("nan")), dict(warmup_steps=-1),
                                 dict(warmup_steps=1.5), dict(width=0), dict(width_scale=0.0)])
def test_bad_hyperparameters_are_rejected(bad):
    with pytest.raises(ValueError):
        WidthScheduleFree([torch.nn.Parameter(torch.zeros(2, 2))], **bad)


def test_eval_writes_x_and_train_restores_y_exactly():
    x, y = _data()
    model = _mlp()
    opt = WidthScheduleFree(model.parameters(), warmup_steps=3)
    _train(model, opt, x, y, 10)      # ends in eval mode: the parameters hold x
    xs = [p.detach().clone() for p in model.parameters()]
    opt.train()
    ys = [p.detach().clone() for p in model.parameters()]
    for p, yy, xx in zip(model.parameters(), ys, xs):
        st = opt.state[p]
        assert torch.equal(yy, st["y"])
        b1 = opt.param_groups[0]["betas"][0]
        torch.testing.assert_close(xx, (st["y"] - (1 - b1) * st["z"]) / b1)
        assert not torch.equal(xx, yy)
    opt.eval()
    opt.eval()   # idempotent
    assert all(torch.equal(a, p) for a, p in zip(xs, model.parameters()))
    with pytest.raises(RuntimeError, match="train"):
        opt.step()


def test_evaluating_mid_run_does_not_change_the_trajectory():
    x, y = _data()
    runs = []
    for every in (0, 3):
        model = _mlp()
        runs.append(_train(model, WidthScheduleFree(model.parameters()), x, y, 12, every))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_a_float32_state(dtype):
    """bf16/fp16 parameters: y, z and v are float32 and the parameter is y rounded once."""
    x, y = _data()
    model = _mlp().to(dtype)
    opt = WidthScheduleFree(model.parameters())
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        opt.step()
    for p in model.parameters():
        st = opt.state[p]
        assert all(st[k].dtype == torch.float32 for k in ("y", "z", "exp_avg_sq"))
        assert torch.equal(p.detach(), st["y"].to(dtype))


def test_state_dict_round_trip_resumes_identically_also_from_eval_mode():
    """A checkpoint taken in eval mode (the CLI saves after opt.eval()) resumes exactly."""
    x, y = _data()
    model = _mlp()
    opt = WidthScheduleFree(model.parameters(), warmup_steps=4)
    _train(model, opt, x, y, 6)   # eval mode now
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    want = _train(model, opt, x, y, 6)
    model2 = _mlp(seed=3)
    model2.load_state_dict(saved_model)
    opt2 = WidthScheduleFree(model2.parameters(), width=99)   # the saved state decides
    opt2.load_state_dict(saved)
    assert opt2.width == opt.width
    got = _train(model2, opt2, x, y, 6)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    with pytest.raises(ValueError, match="schedule_free"):
        WidthScheduleFree(_mlp().parameters()).load_state_dict(
            torch.optim.AdamW(_mlp().parameters(), lr=1e-3).state_dict())


# ---------------------------------------------------------------------------- DDP

def _ddp_train(rank):
    model = _mlp()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = WidthScheduleFree(ddp.parameters(), weight_decay=0.01, warmup_steps=2)
    g = torch.Generator().manual_seed(10 + rank)  # different data per rank
    for _ in range(6):
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    opt.eval()
    return [p.detach() for p in model.parameters()]


def test_ddp_two_gloo_processes_stay_identical_and_match_one_process():
    r0, r1 = run_two_ranks(_ddp_train)
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))
    # one process on the mean of both ranks' losses (= DDP's averaged gradient)
    model = _mlp()
    opt = WidthScheduleFree(model.parameters(), weight_decay=0.01, warmup_steps=2)
    gens = [torch.Generator().manual_seed(10 + r) for r in (0, 1)]
    for _ in range(6):
        batches = [(torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)) for g in gens]
        opt.zero_grad()
        sum(torch.nn.functional.mse_loss(model(x), y) for x, y in batches).div(2).backward()
        opt.step()
    opt.eval()
    for a, b in zip(model.parameters(), r0):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
