"""Curvature-aware optimizers: oracle tests against pytorch-optimizer / torch-optimizer and
the official SophiaG rule, properties from the papers, state_dict resume, GradScaler,
2-process gloo DDP, bad hyperparameters."""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from llmopt_ext.optim import AISARAH, OASIS, AdaHessian, SophiaG, SophiaH, gnb_loss
from llmopt_ext.optim._common import probe_seed

STEPS = 8


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).to(dtype)


def data(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def loss_of(model, x, y):
    return F.cross_entropy(model(x).float(), y)


def assert_models_close(a, b, rtol=1e-5, atol=1e-6):
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# oracles

def test_sophiag_matches_official_rule():
    """The official SophiaG update (Liu et al. 2023, Algorithm 3 / released code), written here."""
    x, y = data()
    ours, ref = mlp(), mlp()
    kw = dict(lr=0.02, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
    bs = 32
    opt = SophiaG(ours.parameters(), bs=bs, **kw)
    m = [torch.zeros_like(p) for p in ref.parameters()]
    h = [torch.zeros_like(p) for p in ref.parameters()]
    for t in range(STEPS):
        if t % 3 == 0:  # GNB refresh every 3 steps, same sampled labels on both sides
            for model, is_ours in ((ours, True), (ref, False)):
                model.zero_grad()
                gnb_loss(model(x), generator=torch.Generator().manual_seed(t)).backward()
                if is_ours:
                    opt.update_hessian()
                else:
                    with torch.no_grad():
                        for hh, p in zip(h, ref.parameters()):
                            hh.mul_(kw["betas"][1]).addcmul_(p.grad, p.grad, value=1 - kw["betas"][1])
        for model in (ours, ref):
            model.zero_grad()
            loss_of(model, x, y).backward()
        opt.step()
        with torch.no_grad():
            for p, mm, hh in zip(ref.parameters(), m, h):
                p.mul_(1 - kw["lr"] * kw["weight_decay"])
                mm.mul_(kw["betas"][0]).add_(p.grad, alpha=1 - kw["betas"][0])
                ratio = (mm.abs() / (kw["rho"] * bs * hh + 1e-15)).clamp(None, 1)
                p.addcmul_(mm.sign(), ratio, value=-kw["lr"])
    assert_models_close(ours, ref)


def _hvp_backward(model, x, y):
    model.zero_grad()
    loss_of(model, x, y).backward(create_graph=True)


def test_sophiah_matches_pytorch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    x, y = data()
    ours, ref = mlp(), mlp()
    kw = dict(lr=0.05, betas=(0.96, 0.99), weight_decay=0.01)
    opt = SophiaH(ours.parameters(), rho=0.02, update_period=3, **kw)
    ref_opt = po.SophiaH(ref.parameters(), p=0.02, update_period=3, foreach=False, **kw)
    for t in range(STEPS):
        _hvp_backward(ours, x, y)
        _hvp_backward(ref, x, y)
        opt.step()
        # the same Gaussian probes: ours come from a generator seeded with probe_seed(seed, t, 0)
        torch.manual_seed(probe_seed(0, t, 0))
        ref_opt.step()
        for model in (ours, ref):
            for p in model.parameters():
                p.grad = None
    assert_models_close(ours, ref)


def test_adahessian_matches_pytorch_optimizer_and_torch_optimizer():
    po = pytest.importorskip("pytorch_optimizer")
    to = pytest.importorskip("torch_optimizer")
    x, y = data()
    models = [mlp(), mlp(), mlp()]
    kw = dict(lr=0.1, betas=(0.9, 0.999), weight_decay=1e-3, hessian_power=1.0)
    opts = [AdaHessian(models[0].parameters(), eps=1e-4, **kw),
            po.AdaHessian(models[1].parameters(), eps=1e-4, foreach=False, **kw),
            to.Adahessian(models[2].parameters(), eps=1e-4, **kw)]
    for t in range(STEPS):
        for model, opt in zip(models, opts):
            _hvp_backward(model, x, y)
            torch.manual_seed(probe_seed(0, t, 0))  # same Rademacher probes for all three
            opt.step()
            for p in model.parameters():
                p.grad = None
    assert_models_close(models[0], models[1])
    assert_models_close(models[0], models[2])


# ---------------------------------------------------------------------------
# properties from the papers

def test_sophiag_moves_no_element_more_than_lr():
    x, y = data()
    model = mlp()
    lr = 0.01
    opt = SophiaG(model.parameters(), lr=lr, weight_decay=0.0, rho=1e-6, bs=1)  # tiny rho: always clipped
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        model.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        moved = max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))
        assert moved <= lr * (1 + 1e-5)
        assert moved >= 0.5 * lr


def test_adahessian_diagonal_quadratic_converges_in_few_steps():
    a = torch.tensor([100.0, 1.0, 0.01, 3.0])
    w = torch.nn.Parameter(torch.ones(4))
    opt = AdaHessian([w], lr=1.0, betas=(0.0, 0.0), eps=0.0)
    for _ in range(2):
        opt.zero_grad()
        (0.5 * (a * w * w).sum()).backward(create_graph=True)
        opt.step()
    # Rademacher probes give D = a exactly, so the first step is Newton's
    assert w.detach().abs().max() < 1e-6


def _logreg(seed=0, n=256, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.2, 3.0, d)  # badly scaled features
    w_true = torch.randn(d, generator=g)
    y = (torch.sigmoid(x @ w_true) > torch.rand(n, generator=g)).float()  # noisy: finite optimum
    return x, y


def _logreg_loss(w, x, y):
    return F.binary_cross_entropy_with_logits(x @ w, y) + 1e-3 * w.square().sum()


def _logreg_optimum(x, y):
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    opt.step(lambda: (opt.zero_grad(), _logreg_loss(w, x, y).backward(), _logreg_loss(w, x, y))[-1])
    return _logreg_loss(w, x, y).item()


def test_oasis_converges_on_logistic_regression():
    x, y = _logreg()
    best = _logreg_optimum(x, y)
    w = torch.nn.Parameter(torch.zeros(x.shape[1]))
    opt = OASIS([w])  # default lr: no tuning
    start = _logreg_loss(w, x, y).item()

    def closure():
        opt.zero_grad()
        loss = _logreg_loss(w, x, y)
        loss.backward(create_graph=True)
        return loss

    for _ in range(60):
        opt.step(closure)
    final = _logreg_loss(w, x, y).item()
    assert final - best < 1e-3 * (start - best)


def _oasis_run(grad_difference, batches, steps):
    """OASIS on logistic regression; batches: None (full batch) or a mini-batch size."""
    x, y = _logreg()
    w = torch.nn.Parameter(torch.zeros(x.shape[1]))
    opt = OASIS([w], grad_difference=grad_difference)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.arange(x.shape[0]) if batches is None else torch.randint(0, x.shape[0], (batches,), generator=g)

        def closure(idx=idx):
            opt.zero_grad()
            loss = _logreg_loss(w, x[idx], y[idx])
            loss.backward(create_graph=True)
            return loss
        opt.step(closure)
    return w.detach(), opt.param_groups[0]["eta"], _logreg_loss(w, x, y).item()


def test_oasis_grad_difference_modes():
    with pytest.raises(ValueError, match="grad_difference"):
        OASIS([torch.nn.Parameter(torch.zeros(2))], grad_difference="other")
    # full batch: the same batch IS the previous batch, so the two modes are the same method
    w_same, eta_same, _ = _oasis_run("same_batch", None, 20)
    w_cons, eta_cons, _ = _oasis_run("consecutive", None, 20)
    assert torch.equal(w_same, w_cons) and eta_same == eta_cons
    # mini-batches of 8: the consecutive difference is mostly batch noise and eta collapses
    # (it can grow by at most sqrt(1 + theta) per step); the same-batch one measures curvature
    _, eta_same, loss_same = _oasis_run("same_batch", 8, 60)
    _, eta_cons, loss_cons = _oasis_run("consecutive", 8, 60)
    assert eta_same > 10 * eta_cons, (eta_same, eta_cons)
    assert loss_same < loss_cons, (loss_same, loss_cons)


def test_aisarah_full_closure_may_yield_chunk_losses():
    # a generator of equally sized chunk losses gives the same outer-loop gradient (and so the
    # same trajectory, up to rounding) as one full-data loss; an empty generator is an error
    x, y = _logreg()
    ws = []
    for chunked in (False, True):
        w = torch.nn.Parameter(torch.zeros(x.shape[1]))
        opt = AISARAH([w], max_inner=4)
        full = (lambda: (_logreg_loss(w, x[i::4], y[i::4]) for i in range(4))) if chunked else \
            (lambda: _logreg_loss(w, x, y))
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            idx = torch.randint(0, x.shape[0], (32,), generator=g)
            opt.step(lambda idx=idx: _logreg_loss(w, x[idx], y[idx]), full_closure=full)
        ws.append(w.detach().clone())
    assert x.shape[0] % 4 == 0
    torch.testing.assert_close(ws[0], ws[1], rtol=1e-5, atol=1e-6)
    opt = AISARAH([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="yielded no losses"):
        opt.step(lambda: opt.param_groups[0]["params"][0].sum(), full_closure=lambda: iter(()))


def test_aisarah_converges_on_logistic_regression():
    x, y = _logreg()
    best = _logreg_optimum(x, y)
    w = torch.nn.Parameter(torch.zeros(x.shape[1]))
    opt = AISARAH([w])  # no learning rate at all
    start = _logreg_loss(w, x, y).item()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, x.shape[0], (32,), generator=g)
        opt.step(lambda idx=idx: _logreg_loss(w, x[idx], y[idx]), full_closure=lambda: _logreg_loss(w, x, y))
    final = _logreg_loss(w, x, y).item()
    assert final - best < 1e-2 * (start - best)


# ---------------------------------------------------------------------------
# state_dict round trip: the resumed trajectory is identical

def _train(kind, model, opt, t0, n, x, y):
    for t in range(t0, t0 + n):
        if kind == "sophiag":
            if t % 2 == 0:
                opt.update_hessian_from_logits(model(x), generator=torch.Generator().manual_seed(t))
            model.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        elif kind in ("sophiah", "adahessian"):
            _hvp_backward(model, x, y)
            opt.step()
        elif kind == "oasis":
            def closure():
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward(create_graph=True)
                return loss
            opt.step(closure)
        else:
            opt.step(lambda: loss_of(model, x[t % 4::4], y[t % 4::4]), full_closure=lambda: loss_of(model, x, y))
        for p in model.parameters():
            p.grad = None


MAKERS = {
    "sophiag": lambda ps: SophiaG(ps, lr=0.01, bs=32),
    "sophiah": lambda ps: SophiaH(ps, update_period=2),
    "adahessian": lambda ps: AdaHessian(ps, lr=0.05, update_each=2),
    "oasis": lambda ps: OASIS(ps),
    "aisarah": lambda ps: AISARAH(ps, max_inner=3),
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_state_dict_resume_is_identical(kind):
    x, y = data()
    model = mlp()
    opt = MAKERS[kind](model.parameters())
    _train(kind, model, opt, 0, 3, x, y)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.pt")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        _train(kind, model, opt, 3, 4, x, y)
        ckpt = torch.load(path, weights_only=True)
    resumed = mlp(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = MAKERS[kind](resumed.parameters())
    opt2.load_state_dict(ckpt["opt"])
    _train(kind, resumed, opt2, 3, 4, x, y)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# GradScaler: scaled steps equal unscaled ones, inf gradients skip the step

@pytest.mark.parametrize("kind", ["sophiag", "adahessian"])
def test_grad_scaler(kind):
    x, y = data()
    plain, scaled = mlp(), mlp()
    make = {"sophiag": lambda ps: SophiaG(ps, lr=0.01, bs=32, rho=1e-3),
            "adahessian": lambda ps: AdaHessian(ps, lr=0.05)}[kind]
    o1, o2 = make(plain.parameters()), make(scaled.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for t in range(3):
        for model, opt, sc in ((plain, o1, None), (scaled, o2, scaler)):
            if kind == "sophiag":
                opt.update_hessian_from_logits(model(x), generator=torch.Generator().manual_seed(t))
            model.zero_grad()
            loss = loss_of(model, x, y)
            (sc.scale(loss) if sc else loss).backward(create_graph=kind == "adahessian")
            if sc:
                sc.step(opt)
                sc.update()
            else:
                opt.step()
            for p in model.parameters():
                p.grad = None
    assert_models_close(plain, scaled, rtol=1e-6, atol=1e-7)
    # an inf gradient: the step is skipped (params, state and step count unchanged)
    before = copy.deepcopy(scaled.state_dict())
    state_before = copy.deepcopy(o2.state_dict()["state"])
    scaled.zero_grad()
    loss = loss_of(scaled, x, y)
    scaler.scale(loss).backward(create_graph=kind == "adahessian")
    next(scaled.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(o2)
    scaler.update()
    for k, v in scaled.state_dict().items():
        assert torch.equal(v, before[k])
    for i, st in o2.state_dict()["state"].items():
        for key in ("exp_avg", "exp_hessian_diag_sq"):
            if key in st:
                assert torch.equal(st[key], state_before[i][key])
        if kind == "adahessian":
            assert torch.equal(st["step"], state_before[i]["step"])


def test_autocast_fp16_with_grad_scaler_runs():
    x, y = data()
    model = mlp()
    opt = SophiaG(model.parameters(), lr=0.01, bs=32)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(2):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(model, x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_params_fp32_state():
    x, y = data()
    model = mlp(dtype=torch.bfloat16)
    opt = SophiaG(model.parameters(), lr=0.01, bs=32)
    model.zero_grad()
    F.cross_entropy(model(x.bfloat16()).float(), y).backward()
    opt.step()
    st = opt.state[next(model.parameters())]
    assert st["exp_avg"].dtype == torch.float32 and st["hessian"].dtype == torch.float32


# ---------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("make", [
    lambda ps: SophiaG(ps, lr=-1.0, bs=1),
    lambda ps: SophiaG(ps, betas=(1.0, 0.99), bs=1),
    lambda ps: SophiaG(ps, betas=(0.9, -0.1), bs=1),
    lambda ps: SophiaG(ps, rho=0.0, bs=1),
    lambda ps: SophiaH(ps, rho=-1.0),
    lambda ps: AdaHessian(ps, lr=-0.1),
    lambda ps: AdaHessian(ps, betas=(0.9, 1.0)),
    lambda ps: AdaHessian(ps, hessian_power=2.0),
    lambda ps: OASIS(ps, lr=0.0),
    lambda ps: AISARAH(ps, beta=1.0),
])
def test_bad_hyperparameters_raise(make):
    with pytest.raises(ValueError):
        make([torch.nn.Parameter(torch.zeros(3))])


@pytest.mark.parametrize("kind", ["sophiag", "sophiah", "adahessian"])
def test_sparse_gradients_raise(kind):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = MAKERS[kind](emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_adahessian_without_create_graph_raises():
    w = torch.nn.Parameter(torch.ones(3))
    opt = AdaHessian([w])
    (w * w).sum().backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()


# ---------------------------------------------------------------------------
# DDP: two gloo processes stay identical

def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        x, y = data(n=64)
        xs, ys = x[rank::world], y[rank::world]  # each rank its own shard
        results = {}
        for kind in ("sophiag", "sophiah", "adahessian", "oasis"):
            model = mlp()
            opt = MAKERS[kind](model.parameters())
            if kind == "sophiag":
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                for t in range(3):
                    opt.update_hessian_from_logits(ddp(xs), generator=torch.Generator().manual_seed(t))
                    opt.zero_grad()
                    loss_of(ddp, xs, ys).backward()
                    opt.step()
            else:
                _train(kind, model, opt, 0, 3, xs, ys)
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            results[kind] = (torch.equal(gathered[0], gathered[1]),
                             not torch.equal(flat, torch.cat([p.reshape(-1) for p in mlp().parameters()])))
        if rank == 0:
            torch.save(results, out)
        # every collective done on both ranks before teardown: tearing gloo down while the
        # peer is still in a collective aborts with "terminate called without an active exception"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_stay_identical():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
        results = torch.load(out)
    for kind, (same, moved) in results.items():
        assert same, f"{kind}: ranks diverged"
        assert moved, f"{kind}: parameters did not move"


def test_oasis_survives_a_stationary_point():
    # Starting at the minimiser the iterate never moves: the step-size bound has no
    # curvature information (||w_k - w_{k-1}|| = 0) and must not drive eta to 0, which used to
    # divide by zero on the next step.
    w = torch.zeros(3, requires_grad=True)
    opt = OASIS([w])

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward(create_graph=True)
        return loss

    for _ in range(4):
        opt.step(closure)
    assert torch.equal(w.detach(), torch.zeros(3))
    assert opt.param_groups[0]["eta"] > 0
