"""TRCG (llmopt_ext.optim.TRCG): oracles (scipy trust-ncg, Rosenbrock), stochastic
mini-batches, a tiny Llama + LoRA, DDP with gloo, checkpointing, non-finite input, host syncs
and vector-op launches per CG iteration, HVP backends, mixed precision and SDPA."""
from __future__ import annotations

import copy
import math
import os
import random
import warnings

import pytest
import torch

from llmopt_ext.optim import TRCG
from llmopt_ext.optim import steihaug as steihaug_mod
from llmopt_ext.optim import trcg as trcg_mod
from llmopt_ext.optim.hvp import DoubleBackwardHVP, ForwardOverReverseHVP

scipy_optimize = pytest.importorskip("scipy.optimize")
np = pytest.importorskip("numpy")


def run(opt, closure, steps):
    for _ in range(steps):
        opt.step(closure)
    return opt


def logistic_data(n=600, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    w_true = torch.randn(d, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(X @ w_true)).float()
    return X, y


def logistic_loss(w, X, y, lam):
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * lam * w.dot(w)


# ---- oracles ---------------------------------------------------------------------------

def test_convex_quadratic_matches_scipy_trust_ncg():
    g = torch.Generator().manual_seed(0)
    n = 30
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = A @ A.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    Hn, bn = H.numpy(), b.numpy()
    ref = scipy_optimize.minimize(lambda x: 0.5 * x @ Hn @ x - bn @ x, np.zeros(n), method="trust-ncg",
                                  jac=lambda x: Hn @ x - bn, hessp=lambda x, p: Hn @ p,
                                  options=dict(gtol=1e-10))
    H32, b32 = H.float(), b.float()
    w = torch.zeros(n, requires_grad=True)
    opt = run(TRCG([w], max_cg_iters=n), lambda: 0.5 * w @ H32 @ w - b32 @ w, 25)
    w_ref = torch.from_numpy(ref.x).float()
    assert torch.linalg.vector_norm(w.detach() - w_ref) <= 2e-4 * torch.linalg.vector_norm(w_ref)
    assert opt.trcg_state["accepted_steps"] >= 20


@pytest.mark.parametrize("preconditioner", [None, "abs_grad_ema"])
def test_logistic_regression_matches_scipy_trust_ncg(preconditioner):
    X, y = logistic_data()
    lam = 1e-2
    Xn, yn = X.double().numpy(), y.double().numpy()

    def f(w):
        z = Xn @ w
        return np.mean(np.logaddexp(0, z) - yn * z) + 0.5 * lam * w @ w

    def jac(w):
        return Xn.T @ (1 / (1 + np.exp(-(Xn @ w))) - yn) / len(yn) + lam * w

    def hessp(w, p):
        s = 1 / (1 + np.exp(-(Xn @ w)))
        return Xn.T @ (s * (1 - s) * (Xn @ p)) / len(yn) + lam * p

    ref = scipy_optimize.minimize(f, np.zeros(X.shape[1]), jac=jac, hessp=hessp, method="trust-ncg",
                                  options=dict(gtol=1e-10))
    w = torch.zeros(X.shape[1], requires_grad=True)
    opt = run(TRCG([w], max_cg_iters=20, preconditioner=preconditioner),
              lambda: logistic_loss(w, X, y, lam), 30)
    w_ref = torch.from_numpy(ref.x).float()
    assert torch.linalg.vector_norm(w.detach() - w_ref) <= 1e-4 * torch.linalg.vector_norm(w_ref)
    assert opt.last_stats["exit"] in ("converged", "zero_gradient")


@pytest.mark.parametrize("n", [2, 10])
def test_rosenbrock_converges_to_ones(n):
    x = torch.tensor([-1.2, 1.0] * (n // 2), requires_grad=True)

    def rosen():
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    opt = TRCG([x], max_cg_iters=2 * n)
    for _ in range(200):
        opt.step(rosen)
        if rosen().item() < 1e-12:
            break
    assert torch.allclose(x.detach(), torch.ones(n), atol=1e-3), x
    exits = opt.last_stats["exit"]
    assert exits  # a reason is always recorded


def test_negative_curvature_takes_minimising_boundary_point():
    # indefinite quadratic: every step must end on the boundary and the model must be exact
    g = torch.Generator().manual_seed(3)
    n = 12
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    H = Q @ torch.diag(torch.linspace(-2.0, 3.0, n)) @ Q.T
    b = torch.randn(n, generator=g)
    w = torch.zeros(n, requires_grad=True)
    opt = TRCG([w], radius=0.5, max_cg_iters=n)
    seen = set()
    for _ in range(6):
        w_before = w.detach().clone()
        opt.step(lambda: 0.5 * w @ H @ w - b @ w)
        st = opt.last_stats
        seen.add(st["exit"])
        s = (w.detach() - w_before) if st["accepted"] else None
        if st["exit"] == "negative_curvature" and s is not None:
            assert math.isclose(s.norm().item(), st["radius_used"], rel_tol=1e-4)
            # quadratic: actual reduction == predicted reduction (from the CG recurrences)
            assert math.isclose(st["actual"], st["pred"], rel_tol=1e-3)
    assert "negative_curvature" in seen


def test_boundary_roots_choose_model_minimiser():
    for s_m_p, p_m_p, s_m_s, radius in [(0.3, 2.0, 0.5, 1.0), (-0.4, 1.5, 0.2, 0.9), (0.0, 1.0, 0.0, 2.0)]:
        tm, tp = trcg_mod.boundary_roots(s_m_p, p_m_p, s_m_s, radius)
        for t in (tm, tp):
            assert math.isclose(s_m_s + 2 * t * s_m_p + t * t * p_m_p, radius**2, rel_tol=1e-12)
        assert tm <= 0 <= tp


# ---- the shrinking-radius problem ------------------------------------------------------------

# ---- steihaug_cg on dense quadratics ----------------------------------------------------

def _quadratic(n, seed, shift):
    """H (float64) with eigenvalues shifted by `shift` (negative: indefinite) and g."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = A @ A.T / n + shift * torch.eye(n, dtype=torch.float64)
    return H, torch.randn(n, generator=g, dtype=torch.float64)


def _as_lists(H, g, split=(5,)):
    """hvp on a two-tensor list (exercises the multi-tensor ops) and r = [g pieces]."""
    sizes = [split[0], H.shape[0] - split[0]]
    H32 = H.float()

    def hvp(v):
        return list(torch.split(H32 @ torch.cat(v), sizes))

    return hvp, [t.clone() for t in torch.split(g.float(), sizes)]


def _model(H, g, s):
    return float(g @ s + 0.5 * s @ H @ s)


@pytest.mark.parametrize("precond", [False, True])
def test_steihaug_cg_interior_matches_dense_solve(precond):
    H, g = _quadratic(12, 0, 0.5)
    hvp, r = _as_lists(H, g)
    minv = None
    if precond:
        d = torch.linspace(0.5, 2.0, 12)
        minv = [t.clone() for t in torch.split(d, [5, 7])]
    res = steihaug_mod.steihaug_cg(hvp, r, minv, radius=1e6, max_iters=40,
                                   tol=1e-6 * float(g.norm()))
    s = torch.cat(res.s).double()
    exact = -torch.linalg.solve(H, g)
    assert res.exit == "converged" and res.iters <= 40
    assert torch.linalg.vector_norm(s - exact) <= 1e-4 * torch.linalg.vector_norm(exact)
    assert res.model_change == pytest.approx(_model(H, g, s), rel=1e-4)
    # r ends as the residual g + H s
    assert torch.allclose(torch.cat(r).double(), g + H @ s, atol=1e-4)
    m = torch.ones(12, dtype=torch.float64) if minv is None else 1.0 / torch.cat(minv).double()
    assert res.s_m_s == pytest.approx(float((s * m * s).sum()), rel=1e-4)


@pytest.mark.parametrize("precond", [False, True])
def test_steihaug_cg_boundary_exit_lies_on_the_m_norm_sphere(precond):
    H, g = _quadratic(12, 1, 0.5)
    hvp, r = _as_lists(H, g)
    minv, m = None, torch.ones(12, dtype=torch.float64)
    if precond:
        d = torch.linspace(0.3, 3.0, 12)
        minv, m = [t.clone() for t in torch.split(d, [5, 7])], 1.0 / d.double()
    exact = -torch.linalg.solve(H, g)
    radius = 0.3 * float((exact * m * exact).sum().sqrt())
    res = steihaug_mod.steihaug_cg(hvp, r, minv, radius=radius, max_iters=40, tol=1e-8)
    s = torch.cat(res.s).double()
    assert res.exit == "boundary"
    assert float((s * m * s).sum().sqrt()) == pytest.approx(radius, rel=1e-5)
    assert res.s_m_s == pytest.approx(radius**2)
    assert res.model_change == pytest.approx(_model(H, g, s), rel=1e-4)
    # at least the Cauchy decrease (Steihaug's guarantee): the first CG step is the
    # preconditioned steepest descent step clamped to the region
    assert res.model_change < 0


def test_steihaug_cg_negative_curvature_goes_to_the_minimising_boundary_point():
    H, g = _quadratic(10, 2, -2.0)
    assert float(torch.linalg.eigvalsh(H)[0]) < 0
    hvp, r = _as_lists(H, g)
    res = steihaug_mod.steihaug_cg(hvp, r, None, radius=0.7, max_iters=40, tol=1e-8)
    s = torch.cat(res.s).double()
    assert res.exit in ("negative_curvature", "boundary")
    assert float(s.norm()) == pytest.approx(0.7, rel=1e-5)
    assert res.model_change == pytest.approx(_model(H, g, s), rel=1e-4)
    # H = -I: the first direction has negative curvature; the model minimiser on the sphere
    # is the steepest-descent boundary point -radius g / ||g||
    hvp, r = _as_lists(-torch.eye(10, dtype=torch.float64), g)
    res = steihaug_mod.steihaug_cg(hvp, r, None, radius=0.7, max_iters=40, tol=1e-8)
    assert res.exit == "negative_curvature" and res.iters == 1
    s = torch.cat(res.s).double()
    assert torch.allclose(s, -0.7 * g / g.norm(), atol=1e-6)
    assert res.model_change == pytest.approx(_model(-torch.eye(10, dtype=torch.float64), g, s), rel=1e-5)


def test_steihaug_cg_max_iters_zero_gradient_and_nonfinite_exits():
    H, g = _quadratic(12, 3, 0.5)
    hvp, r = _as_lists(H, g)
    res = steihaug_mod.steihaug_cg(hvp, r, None, radius=1e6, max_iters=3, tol=0.0)
    assert (res.exit, res.iters) == ("max_iters", 3)
    assert res.model_change == pytest.approx(_model(H, g, torch.cat(res.s).double()), rel=1e-4)
    hvp, r = _as_lists(H, torch.zeros(12, dtype=torch.float64))
    res = steihaug_mod.steihaug_cg(hvp, r, None, radius=1.0, max_iters=3, tol=0.0)
    assert (res.exit, res.iters) == ("zero_gradient", 0)
    _, r = _as_lists(H, g)
    res = steihaug_mod.steihaug_cg(lambda v: [torch.full_like(t, float("nan")) for t in v], r, None,
                                   radius=1.0, max_iters=3, tol=0.0)
    assert (res.exit, res.iters) == ("nonfinite", 1)


def test_log_symmetric_radius_does_not_collapse_when_most_steps_succeed():
    rnd = random.Random(0)
    kw = dict(shrink_below=0.25, expand_above=0.75, min_radius=1e-30, max_radius=1e30)
    ours = textbook = 1.0
    for _ in range(3000):
        ok = rnd.random() < 0.6  # 60% of mini-batch models are right at the boundary
        rho = 0.9 if ok else 0.1
        ours = trcg_mod.update_radius(ours, rho, "boundary", ours, shrink=0.5, expand=2.0, **kw)
        textbook = trcg_mod.update_radius(textbook, rho, "boundary", textbook, shrink=0.25, expand=2.0, **kw)
    assert ours > 1e3      # drifts up (capped by max_radius in practice)
    assert textbook < 1e-3  # x0.25 / x2 needs > 2/3 successes


def test_stochastic_minibatch_logistic_regression():
    X, y = logistic_data(n=8192, d=10, seed=1)
    lam = 1e-3
    w_star = torch.zeros(10, requires_grad=True)
    run(TRCG([w_star], max_cg_iters=20), lambda: logistic_loss(w_star, X, y, lam), 25)
    f_star = logistic_loss(w_star.detach(), X, y, lam).item()

    gen = torch.Generator().manual_seed(2)
    w = torch.zeros(10, requires_grad=True)
    opt = TRCG([w])  # defaults
    radii, losses = [], []
    for _ in range(60):
        idx = torch.randint(0, X.shape[0], (512,), generator=gen)
        xb, yb = X[idx], y[idx]
        opt.step(lambda: logistic_loss(w, xb, yb, lam))
        radii.append(opt.trcg_state["radius"])
        losses.append(logistic_loss(w.detach(), X, y, lam).item())
    excess = sum(losses[-10:]) / 10 - f_star
    assert 0 <= excess < 0.01, excess  # d / (2 * batch) ~ 0.01 is the mini-batch noise floor
    assert min(radii[-30:]) >= 0.25, radii  # no collapse: the radius stays at the step scale


# ---- tiny Llama + LoRA ------------------------------------------------------------------

def _tiny_llama_lora(attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    cfg._attn_implementation = attn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(cfg)
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def _token_batches(seed):
    gen = torch.Generator().manual_seed(seed)

    def batch():
        start = torch.randint(0, 64, (8, 1), generator=gen)
        return (start + torch.arange(16) * 3) % 64  # a learnable rule: +3 mod 64

    return batch


def test_tiny_llama_lora_loss_decreases_with_defaults():
    model = _tiny_llama_lora()
    batch = _token_batches(1)
    held_out = batch()
    with torch.no_grad():
        before = model(input_ids=held_out, labels=held_out).loss.item()
    opt = TRCG([p for p in model.parameters() if p.requires_grad])
    for _ in range(30):
        ids = batch()
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    with torch.no_grad():
        after = model(input_ids=held_out, labels=held_out).loss.item()
    assert after < before - 0.08, (before, after)
    assert opt.trcg_state["accepted_steps"] >= 20
    assert opt.trcg_state["radius"] >= 1e-3


def test_fused_sdpa_has_no_double_backward_and_math_backend_fixes_it():
    model = _tiny_llama_lora("sdpa")
    ids = _token_batches(0)()
    opt = TRCG([p for p in model.parameters() if p.requires_grad], sdpa_math=False)
    with pytest.raises(RuntimeError, match="math backend"):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    opt = TRCG([p for p in model.parameters() if p.requires_grad])  # sdpa_math=True
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    assert opt.last_stats["hvps"] >= 1


def test_autocast_bf16_keeps_cg_in_fp32():
    model = _tiny_llama_lora("eager")
    batch = _token_batches(4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = TRCG(params)
    seen = []
    orig = steihaug_mod.mt_cg_step_

    def spy(xs, rs, ps, hps, alpha, minv=None):
        seen.append({t.dtype for t in (*xs, *rs, *ps, *hps)})
        return orig(xs, rs, ps, hps, alpha, minv)

    steihaug_mod.mt_cg_step_ = spy
    try:
        for _ in range(3):
            ids = batch()

            def closure():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(input_ids=ids, labels=ids).loss

            opt.step(closure)
            assert math.isfinite(opt.last_stats["loss"])
    finally:
        steihaug_mod.mt_cg_step_ = orig
    assert seen and all(d == {torch.float32} for d in seen)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)


def test_bf16_parameters_use_fp32_cg_vectors():
    X, y = logistic_data(n=200, d=6)
    w = torch.zeros(6, dtype=torch.bfloat16, requires_grad=True)
    opt = run(TRCG([w]), lambda: logistic_loss(w.float(), X, y, 1e-2), 8)
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()
    assert opt.trcg_state["accepted_steps"] >= 5


# ---- HVP backends -----------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def test_forward_over_reverse_hvp_matches_double_backward():
    model = _mlp()
    x, t = torch.randn(9, 5), torch.randn(9, 3)
    params = list(model.parameters())

    def closure():
        return ((model(x) - t) ** 2).mean()

    vs = [torch.randn_like(p) for p in params]
    db = DoubleBackwardHVP(closure(), params)(vs)
    fr = ForwardOverReverseHVP(closure(), params, model, closure)(vs)
    for a, b in zip(db, fr):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_forward_over_reverse_trajectory_matches_double_backward():
    x, t = torch.randn(16, 5), torch.randn(16, 3)
    finals = []
    for method in ("double_backward", "forward_over_reverse"):
        model = _mlp()
        opt = TRCG(model.parameters(), hvp=method, model=model)
        run(opt, lambda: ((model(x) - t) ** 2).mean(), 5)
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], atol=1e-4, rtol=1e-3)


# ---- checkpointing, non-finite input, syncs ----------------------------------------------

def test_state_dict_round_trip_gives_identical_trajectory():
    X, y = logistic_data(n=400, d=8, seed=5)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 400, (64,), generator=gen) for _ in range(10)]

    def make():
        w = torch.zeros(8, requires_grad=True)
        return w, TRCG([w], radius=0.3, preconditioner="abs_grad_ema")

    w, opt = make()
    for i in range(4):
        opt.step(lambda i=i: logistic_loss(w, X[batches[i]], y[batches[i]], 1e-2))
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())  # as torch.save would
    for i in range(4, 10):
        opt.step(lambda i=i: logistic_loss(w, X[batches[i]], y[batches[i]], 1e-2))

    w2, opt2 = make()
    with torch.no_grad():
        w2.copy_(saved_w)
    opt2.load_state_dict(saved)
    assert opt2.trcg_state["radius"] == saved["trcg"]["radius"]
    for i in range(4, 10):
        opt2.step(lambda i=i: logistic_loss(w2, X[batches[i]], y[batches[i]], 1e-2))
    assert torch.equal(w.detach(), w2.detach())
    assert opt.trcg_state == opt2.trcg_state


@pytest.mark.parametrize("where", ["loss", "trial_loss", "gradient", "hvp"])
def test_nonfinite_is_rejected_params_unchanged(where):
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)

    def closure():
        loss = (w**4).sum() + w.sum()
        if where == "loss":
            loss = loss * float("nan")
        elif where == "trial_loss" and not torch.is_grad_enabled():
            loss = loss + float("inf")
        elif where == "gradient":  # value 0, derivative 0 * inf = NaN
            loss = loss + 0 * torch.sqrt(w[0] - w[0].detach())
        elif where == "hvp":  # value and gradient finite, second derivative NaN
            loss = loss + ((w[0] - w[0].detach()) ** 2) ** 1.5
        return loss

    before = w.detach().clone()
    opt = TRCG([w], radius=1.0)
    opt.step(closure)
    assert torch.equal(w.detach(), before)
    assert not opt.last_stats["accepted"]
    if where == "trial_loss":  # an ordinary rejected step: the radius shrinks
        assert opt.trcg_state["radius"] < 1.0
        assert opt.last_stats["exit"] in ("boundary", "negative_curvature", "converged")
        assert opt.skipped_steps == 0
    else:  # a non-finite loss / gradient / HVP skips the step: nothing changes, it is counted
        assert opt.last_stats["exit"] == "nonfinite" and opt.last_stats["skipped"]
        assert opt.trcg_state["radius"] == 1.0 and opt.trcg_state["steps"] == 0
        assert opt.skipped_steps == 1


def test_one_host_sync_and_three_vector_launches_per_cg_iteration(monkeypatch):
    counts = {"sync": 0, "vec": 0}

    def counting(fn, key):
        def wrapper(*a, **k):
            counts[key] += 1
            return fn(*a, **k)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name), "sync"))
    for name in ("mt_dot", "mt_norm_sq", "mt_axpby_", "mt_cg_step_", "mt_cg_direction_"):
        monkeypatch.setattr(steihaug_mod, name, counting(getattr(steihaug_mod, name), "vec"))

    g = torch.Generator().manual_seed(1)
    n = 40
    A = torch.randn(n, n, generator=g)
    H = A @ A.T / n + torch.eye(n)
    b = torch.randn(n, generator=g)
    w = torch.zeros(n, requires_grad=True)
    opt = TRCG([w], radius=100.0, max_cg_iters=n, cg_tol=lambda r0: 1e-4 * r0)
    opt.step(lambda: 0.5 * w @ H @ w - b @ w)
    st = opt.last_stats
    assert st["exit"] == "converged" and st["cg_iters"] >= 5
    # one sync to start (loss, ||g||, g'z), one per CG iteration, one for the trial loss
    assert counts["sync"] == st["cg_iters"] + 2 == st["syncs"]
    # start: direction + norm; per iteration: p'Hp, fused step, new direction (not after the last)
    assert counts["vec"] == 2 + 3 * st["cg_iters"] - 1
    assert st["hvps"] == st["cg_iters"]


def test_bad_arguments():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="closure"):
        TRCG([w]).step()
    with pytest.raises(RuntimeError, match="does not require grad"):
        TRCG([w]).step(lambda: w.detach().sum())
    with pytest.raises(ValueError, match="radius"):
        TRCG([w], radius=0.0)
    with pytest.raises(ValueError, match="model"):
        TRCG([w], hvp="forward_over_reverse")
    with pytest.raises(ValueError, match="preconditioner"):
        TRCG([w], preconditioner="adam")


# ---- torch.distributed ------------------------------------------------------------------

def _ddp_worker(rank, world, port, out_dir, wrap_ddp):
    import torch.distributed as dist  # noqa: PLC0415

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _mlp()
        net = torch.nn.parallel.DistributedDataParallel(model) if wrap_ddp else model
        X, T = _ddp_data()
        half = X.shape[0] // world
        xb, tb = X[rank * half:(rank + 1) * half], T[rank * half:(rank + 1) * half]
        opt = TRCG(model.parameters(), preconditioner="abs_grad_ema")
        for _ in range(5):
            opt.step(lambda: ((net(xb) - tb) ** 2).mean())
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.save(flat, os.path.join(out_dir, f"rank{rank}.pt"))
        # every collective done on both ranks before teardown: tearing gloo down while the
        # peer is still in a collective aborts with "terminate called without an active exception"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(32, 5, generator=g), torch.randn(32, 3, generator=g)


@pytest.mark.parametrize("wrap_ddp", [False, True], ids=["process_group", "ddp_module"])
def test_ddp_two_gloo_ranks_identical_and_match_single_process(tmp_path, wrap_ddp):
    import torch.multiprocessing as mp  # noqa: PLC0415

    port = 29500 + random.Random().randrange(2000)
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), wrap_ddp), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert torch.equal(r0, r1)
    model = _mlp()
    X, T = _ddp_data()
    opt = TRCG(model.parameters(), preconditioner="abs_grad_ema")
    run(opt, lambda: ((model(X) - T) ** 2).mean(), 5)
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(r0, single, atol=1e-4, rtol=1e-4)
