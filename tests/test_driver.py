"""The optimizer driving contract (llmopt_ext.optim.driver): every optimizer, and a stock
torch.optim one, steps through the one driver; the front ends hold no per-optimizer code."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

from llmopt_ext import optim as O
from llmopt_ext.optim import driver

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


BUILDERS = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "SGD": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "GoLoreAdamW": lambda p: O.GoLoreAdamW(p, lr=1e-2, rank=2, total_steps=5),
    "SophiaG": lambda p: O.SophiaG(p, lr=1e-2, bs=16, update_period=2),
    "SophiaH": lambda p: O.SophiaH(p, lr=1e-2, update_period=2),
    "AdaHessian": lambda p: O.AdaHessian(p, lr=1e-2),
    "OASIS": lambda p: O.OASIS(p, lr=1e-2),
    "AISARAH": lambda p: O.AISARAH(p),
    "TRCG": lambda p: O.TRCG(p, max_cg_iters=3),
    "HyperAdamW": lambda p: O.HyperAdamW(p),
    "WidthScheduleFree": lambda p: O.WidthScheduleFree(p),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_optimizer_steps_through_drive_step(name):
    model = _model()
    x, y = _data()
    opt = BUILDERS[name](list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    loss_fns = [lambda i=i: torch.nn.functional.cross_entropy(model(x[i::2]), y[i::2]) for i in range(2)]
    ctx = driver.StepContext(n_tokens=16, logits=lambda: (model(x), None),
                             full_loss=lambda: torch.nn.functional.cross_entropy(model(x), y))
    losses = [float(driver.drive_step(opt, loss_fns, ctx=ctx)) for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # no graph is left on .grad after a step (it would keep the whole graph alive)
    assert all(p.grad is None or p.grad.grad_fn is None for p in model.parameters())


def test_drive_step_matches_a_hand_written_adamw_loop():
    m1, m2 = _model(), _model()
    x, y = _data()
    o1, o2 = torch.optim.AdamW(m1.parameters(), lr=1e-2), torch.optim.AdamW(m2.parameters(), lr=1e-2)
    for _ in range(3):
        driver.drive_step(o1, lambda: torch.nn.functional.cross_entropy(m1(x), y), max_grad_norm=0.5)
        o2.zero_grad()
        torch.nn.functional.cross_entropy(m2(x), y).backward()
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.5)
        o2.step()
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_contract_defaults_for_a_third_party_optimizer():
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    assert driver.step_kind(opt) == driver.StepKind.BACKWARD
    assert not driver.needs_graph(opt) and not driver.lr_free(opt) and not driver.uses_hvp(opt)
    assert driver.supports_grad_scaler(opt) and driver.accepts_grad_clipping(opt)


def test_contract_is_declared_by_each_class():
    assert driver.lr_free(O.TRCG) and driver.lr_free(O.AISARAH)
    assert driver.step_kind(O.OASIS) == driver.StepKind.CLOSURE_BACKWARD
    assert not driver.lr_schedulable(O.OASIS)
    assert not driver.supports_grad_scaler(O.SophiaH) and driver.supports_grad_scaler(O.AdaHessian)
    # SophiaH keeps the graph only on the steps that refresh its Hessian estimate
    model = _model()
    x, y = _data()
    opt = O.SophiaH(model.parameters(), update_period=3)
    graphs = []
    for _ in range(6):
        graphs.append(driver.needs_graph(opt))
        driver.drive_step(opt, lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert graphs == [True, False, False, True, False, False]


def test_grad_scaler_refused_for_an_optimizer_that_cannot_take_one():
    model = _model()
    x, y = _data()
    opt = O.TRCG(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="GradScaler"):
        driver.drive_step(opt, lambda: torch.nn.functional.cross_entropy(model(x), y), scaler=scaler)


def test_sophiag_refresh_generator_survives_state_dict():
    """A resumed SophiaG draws the same GNB labels as the uninterrupted run."""
    x, y = _data()

    def run(split):
        model = _model()
        opt = O.SophiaG(model.parameters(), lr=1e-2, bs=16, update_period=1, seed=3)
        ctx = driver.StepContext(logits=lambda: (model(x), None))
        for i in range(4):
            if split and i == 2:
                sd = opt.state_dict()
                opt = O.SophiaG(model.parameters(), lr=1e-2, bs=16, update_period=1, seed=3)
                opt.load_state_dict(sd)
            driver.drive_step(opt, lambda: torch.nn.functional.cross_entropy(model(x), y), ctx=ctx)
        return [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


def test_front_ends_hold_no_per_optimizer_code():
    """The CLI loop and LlmoptTrainer read the contract, never an optimizer's name or type."""
    names = r"\b(TRCG|SophiaG|SophiaH|AdaHessian|OASIS|AISARAH|GoLoreAdamW|HyperAdamW|WidthScheduleFree)\b"
    for rel in ("llmopt_ext/finetune/train.py", "llmopt_ext/finetune/hf.py"):
        code = "\n".join(l for l in (ROOT / rel).read_text().splitlines()
                         if not l.lstrip().startswith(("#", "``", "*")))
        code = re.sub(r'"""[\s\S]*?"""', "", code)
        assert not re.search(names, code), f"{rel} names an optimizer class"
        assert "isinstance(opt" not in code and "optimizer ==" not in code, rel
        assert not re.search(r'"(trcg|sophiag|sophiah|adahessian|oasis|aisarah|golore|sf-width)"', code), rel
