"""Reliability of every optimizer of llmopt_ext.optim: non-finite steps are skipped and
counted without touching parameters or state, resume with fp32/bf16/fp16 parameters is
bit-identical, hyper-parameters of every group are validated up front, a state_dict of
another parameter layout is refused at load time."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llmopt_ext.optim import (AISARAH, OASIS, TRCG, AdaHessian, GoLoreAdamW, HyperAdamW, SophiaG,
                              SophiaH, WidthScheduleFree)
from llmopt_ext.optim.driver import skipped_steps

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def mlp(seed=0, dtype=torch.float32, widths=(6, 8, 5)):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(widths[0], widths[1]), torch.nn.Tanh(),
                               torch.nn.Linear(widths[1], widths[2])).to(dtype)


def data(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


MAKERS = {
    "sophiag": lambda ps: SophiaG(ps, lr=0.01, bs=16),
    "sophiah": lambda ps: SophiaH(ps, update_period=2),
    "adahessian": lambda ps: AdaHessian(ps, lr=0.05, update_each=2),
    "oasis": lambda ps: OASIS(ps),
    "aisarah": lambda ps: AISARAH(ps, max_inner=3),
    "golore": lambda ps: GoLoreAdamW(ps, lr=1e-2, rank=2, update_proj_gap=2, seed=0),
    "trcg": lambda ps: TRCG(ps, radius=0.5, preconditioner="abs_grad_ema"),
    "hyperadamw": lambda ps: HyperAdamW(ps, weight_decay=0.01),
    "sf-width": lambda ps: WidthScheduleFree(ps, weight_decay=0.01, warmup_steps=2),
}
HVP_KINDS = ["sophiah", "adahessian", "oasis", "aisarah", "trcg"]


def _loss(model, x, y, poison=None):
    out = model(x.to(next(model.parameters()).dtype))
    loss = F.cross_entropy(out.float(), y)
    w0 = next(model.parameters()).reshape(-1)[0].float()
    if poison == "loss":
        loss = loss * float("nan")
    elif poison == "grad":  # value unchanged, derivative 0 * inf = NaN
        loss = loss + 0 * torch.sqrt(w0 - w0.detach())
    elif poison == "hvp":  # value and gradient finite, second derivative NaN
        loss = loss + ((w0 - w0.detach()) ** 2) ** 1.5
    return loss


def do_step(kind, model, opt, x, y, t, poison=None):
    """One step of `kind` on the batch (x, y); `poison` makes it non-finite."""
    if kind == "sophiag":
        if t % 2 == 1:  # GNB refresh before the odd steps (the checks poison even ones)
            opt.update_hessian_from_logits(model(x.to(next(model.parameters()).dtype)).float(),
                                           generator=torch.Generator().manual_seed(t))
        model.zero_grad(set_to_none=True)
        _loss(model, x, y, poison).backward()
        opt.step()
    elif kind in ("sophiah", "adahessian"):
        model.zero_grad(set_to_none=True)
        _loss(model, x, y, poison).backward(create_graph=True)
        opt.step()
    elif kind in ("golore", "hyperadamw", "sf-width"):
        model.zero_grad(set_to_none=True)
        _loss(model, x, y, poison).backward()
        opt.step()
    elif kind == "oasis":
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, x, y, poison)
            loss.backward(create_graph=True)
            return loss
        opt.step(closure)
    elif kind == "aisarah":
        opt.step(lambda: _loss(model, x[t % 4::4], y[t % 4::4], poison),
                 full_closure=lambda: _loss(model, x, y, poison))
    else:
        opt.step(lambda: _loss(model, x, y, poison))
    for p in model.parameters():
        p.grad = None


def _snapshot(model, opt):
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        g.pop("step_count", None)  # the refresh schedule of Sophia/AdaHessian (see below)
    if "trcg" in sd:
        sd["trcg"] = {k: v for k, v in sd["trcg"].items() if k not in ("hvps", "syncs", "skipped_steps")}
    return [p.detach().clone() for p in model.parameters()], sd


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (path, a.keys(), b.keys())
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


# ---------------------------------------------------------------------------- non-finite steps

@pytest.mark.parametrize("poison", ["loss", "grad", "hvp"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_nonfinite_step_is_skipped_counted_and_training_goes_on(kind, poison):
    if poison == "hvp" and kind not in HVP_KINDS:
        pytest.skip("no Hessian-vector product")
    x, y = data()
    model = mlp()
    opt = MAKERS[kind](list(model.parameters()))
    for t in range(4):
        do_step(kind, model, opt, x, y, t)
    assert skipped_steps(opt) == 0
    before_p, before_s = _snapshot(model, opt)
    do_step(kind, model, opt, x, y, 4, poison)  # step 4 refreshes every Hessian estimate
    after_p, after_s = _snapshot(model, opt)
    _assert_same(before_p, after_p, "params")
    _assert_same(before_s, after_s)
    assert skipped_steps(opt) == 1
    for t in range(5, 8):  # trains on normally
        do_step(kind, model, opt, x, y, t)
    assert skipped_steps(opt) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_p, model.parameters()))


@pytest.mark.parametrize("kind", ["oasis", "aisarah", "golore", "trcg", "hyperadamw", "sf-width"])
def test_skipped_step_leaves_the_trajectory_of_a_run_without_it(kind):
    """Optimizers whose step reads its state on the host skip a non-finite step completely:
    the run continues exactly as if that step had never been taken."""
    x, y = data()
    runs = []
    for with_nan in (False, True):
        model = mlp()
        opt = MAKERS[kind](list(model.parameters()))
        t = 0
        for i in range(6):
            if with_nan and i == 3:
                do_step(kind, model, opt, x, y, t, "loss")
            do_step(kind, model, opt, x, y, t)
            t += 1
        runs.append([p.detach().clone() for p in model.parameters()])
    _assert_same(runs[0], runs[1], "params")


def test_sophiag_nonfinite_gnb_refresh_leaves_the_hessian():
    x, y = data()
    model = mlp()
    opt = MAKERS["sophiag"](list(model.parameters()))
    for t in range(2):
        do_step("sophiag", model, opt, x, y, t)
    before = [opt.state[p]["hessian"].clone() for p in model.parameters()]
    w0 = next(model.parameters()).reshape(-1)[0]
    logits = model(x) + 0 * torch.sqrt(w0 - w0.detach())  # finite logits, NaN gradient
    opt.update_hessian_from_logits(logits, generator=torch.Generator().manual_seed(0))
    _assert_same(before, [opt.state[p]["hessian"] for p in model.parameters()], "hessian")
    assert skipped_steps(opt) == 1


@pytest.mark.parametrize("kind", ["sophiag", "adahessian"])
def test_nonfinite_gradient_skipped_with_a_grad_scaler(kind):
    """The optimizer's own flag and GradScaler's found_inf are combined: a NaN the scaler
    reports, or one it cannot see, both leave parameters and state untouched."""
    x, y = data()
    model = mlp()
    opt = MAKERS[kind](list(model.parameters()))
    for t in range(2):
        do_step(kind, model, opt, x, y, t)
    before_p, before_s = _snapshot(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    model.zero_grad(set_to_none=True)
    scaler.scale(_loss(model, x, y, "loss")).backward(create_graph=kind == "adahessian")
    scaler.step(opt)
    scaler.update()
    model.zero_grad(set_to_none=True)
    after_p, after_s = _snapshot(model, opt)
    _assert_same(before_p, after_p, "params")
    _assert_same(before_s, after_s)
    assert skipped_steps(opt) == 1


def test_trcg_preconditioner_does_not_absorb_a_nan_gradient():
    """Before: the abs_grad_ema EMA took the NaN, and every later step was rejected."""
    x, y = data()
    model = mlp()
    opt = MAKERS["trcg"](list(model.parameters()))
    do_step("trcg", model, opt, x, y, 0)
    do_step("trcg", model, opt, x, y, 1, "grad")
    accepted = opt.trcg_state["accepted_steps"]
    for t in range(2, 6):
        do_step("trcg", model, opt, x, y, t)
    assert opt.trcg_state["accepted_steps"] > accepted
    assert all(torch.isfinite(opt.state[p]["precond_ema"]).all() for p in model.parameters())


# ---------------------------------------------------------------------------- resume

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_resume_is_bit_identical_and_state_keeps_its_dtype(kind, dtype):
    x, y = data()
    model = mlp(dtype=dtype)
    opt = MAKERS[kind](list(model.parameters()))
    for t in range(3):
        do_step(kind, model, opt, x, y, t)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())  # as torch.save / torch.load would give it
    for t in range(3, 6):
        do_step(kind, model, opt, x, y, t)

    resumed = mlp(seed=7, dtype=dtype)
    resumed.load_state_dict(saved_model)
    opt2 = MAKERS[kind](list(resumed.parameters()))
    opt2.load_state_dict(saved)
    saved_dtypes = {k: v.dtype for st in saved["state"].values() for k, v in st.items()
                    if isinstance(v, torch.Tensor)}
    for st in opt2.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == saved_dtypes[k], (k, v.dtype)
    for t in range(3, 6):
        do_step(kind, resumed, opt2, x, y, t)
    _assert_same([p.detach() for p in model.parameters()], [p.detach() for p in resumed.parameters()],
                 "params")


# ---------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("kind", list(MAKERS))
def test_state_dict_of_another_layout_is_refused_at_load(kind):
    x, y = data()
    model = mlp()
    opt = MAKERS[kind](list(model.parameters()))
    for t in range(2):
        do_step(kind, model, opt, x, y, t)
    other = mlp(widths=(6, 9, 5))  # same number of tensors, other shapes
    opt2 = MAKERS[kind](list(other.parameters()))
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match="shape"):
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _assert_same(before, opt2.state_dict())  # nothing loaded


# ---------------------------------------------------------------------------- hyper-parameters

def _two_groups(**second):
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    return [{"params": [a]}, {"params": [b], **second}], b


BAD_GROUPS = [
    (lambda g: SophiaG(g, bs=8), dict(lr=-1.0), "lr"),
    (lambda g: SophiaG(g, bs=8), dict(betas=(0.9, 1.5)), "beta2"),
    (lambda g: SophiaG(g, bs=8), dict(bs=0), "bs"),
    (lambda g: SophiaH(g), dict(betas=(0.9, 1.5)), "beta2"),
    (lambda g: SophiaH(g), dict(rho=float("nan")), "rho"),
    (lambda g: AdaHessian(g), dict(lr=-1.0), "lr"),
    (lambda g: AdaHessian(g), dict(hessian_power=2.0), "hessian_power"),
    (lambda g: GoLoreAdamW(g, rank=None), dict(lr=float("inf")), "lr"),
    (lambda g: GoLoreAdamW(g, rank=None), dict(weight_decay=float("nan")), "weight_decay"),
    (lambda g: GoLoreAdamW(g, rank=None), dict(scale=float("nan")), "scale"),
    (lambda g: GoLoreAdamW(g, rank=None), dict(eps=-1.0), "eps"),
    (lambda g: TRCG(g), dict(precond_beta=1.5), "precond_beta"),
    (lambda g: TRCG(g), dict(precond_beta=float("nan")), "precond_beta"),
    (lambda g: TRCG(g), dict(precond_eps=-1e-3), "precond_eps"),
    (lambda g: TRCG(g), dict(eta=0.5), "eta"),  # valid alone, but differs from group 0
]


@pytest.mark.parametrize("make,bad,name", BAD_GROUPS)
def test_bad_group_rejected_in_constructor_and_add_param_group(make, bad, name):
    groups, _ = _two_groups(**bad)
    with pytest.raises(ValueError, match=name):
        make(groups)
    groups, b = _two_groups()
    opt = make(groups[:1])
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [b], **bad})
    assert len(opt.param_groups) == n  # nothing added


@pytest.mark.parametrize("make,bad", [
    (lambda g: TRCG(g, precond_beta=1.5), "precond_beta"),
    (lambda g: TRCG(g, precond_eps=float("nan")), "precond_eps"),
    (lambda g: GoLoreAdamW(g, lr=float("nan")), "lr"),
])
def test_bad_constructor_hyperparameters(make, bad):
    with pytest.raises(ValueError, match=bad):
        make([torch.zeros(3, requires_grad=True)])


def test_sophiag_second_group_lr_fails_before_any_update():
    """Before: the first group was updated, then the second group's lr=-1 raised mid-step."""
    groups, _ = _two_groups(lr=-1.0)
    with pytest.raises(ValueError, match="lr"):
        SophiaG(groups, bs=8)


# ---------------------------------------------------------------------------- AdaHessian

def test_adahessian_parameter_first_seen_on_a_non_refresh_step_waits_for_the_next_refresh():
    """update_each=2: a parameter whose first gradient comes at step 1 (no fresh Hessian
    estimate) is not updated until step 2 refreshes the estimate (was: KeyError 'hessian')."""
    torch.manual_seed(0)
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    opt = AdaHessian([a, b], lr=0.05, update_each=2)
    (a**4).sum().backward(create_graph=True)
    opt.step()
    a.grad = None
    b0 = b.detach().clone()
    ((a**4).sum() + (b**4).sum()).backward()  # step 1: no refresh, no graph
    opt.step()
    assert torch.equal(b.detach(), b0) and "hessian" not in opt.state[b]
    a.grad = b.grad = None
    ((a**4).sum() + (b**4).sum()).backward(create_graph=True)  # step 2: refresh
    opt.step()
    assert not torch.equal(b.detach(), b0) and torch.isfinite(b).all()
