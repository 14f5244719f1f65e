"""SubspaceProjector and GoLoreAdamW: projection types and schedule, SVD mode against
galore-torch's projector, moment transfer on refresh, AdamW equivalence without projection,
a step-by-step reference, state_dict resume, bf16 parameters, the GoLore counterexample and
DDP (2 gloo processes)."""
from __future__ import annotations

import io
import os
import tempfile

import pytest
import torch

from bench.baselines import galore_torch
from llmopt_ext.optim import GoLoreAdamW, SubspaceProjector


def galore_projector_class():
    return galore_torch("galore_projector", "GaLoreProjector")


def grads(shape, n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(n)]


# ---------------------------------------------------------------------------
# SubspaceProjector

@pytest.mark.parametrize("proj_type", ["left", "right", "std", "reverse_std"])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_projector_against_galore(proj_type, shape):
    GaLoreProjector = galore_projector_class()
    if GaLoreProjector is None:
        pytest.skip("galore-torch is not importable")
    rank, gap, scale = 3, 4, 0.25
    ours = SubspaceProjector(rank, gap, scale, proj_type, rand_ratio=1.0)
    theirs = GaLoreProjector(rank, update_proj_gap=gap, scale=scale, proj_type=proj_type)
    for step, g in enumerate(grads(shape, 10, seed=1)):
        low_ours = ours.project(g, step)
        low_theirs = theirs.project(g, step)
        assert low_ours.shape == low_theirs.shape
        # singular vectors are defined up to sign: compare |coordinates| and the projection P P^T g
        assert torch.allclose(low_ours.abs(), low_theirs.abs(), atol=1e-5, rtol=1e-5)
        back_ours, back_theirs = ours.project_back(low_ours), theirs.project_back(low_theirs)
        assert torch.allclose(back_ours, back_theirs, atol=1e-5, rtol=1e-5)
    assert ours.refreshes == 3  # steps 0, 4, 8


def test_projector_svd_mode_is_top_subspace():
    g = grads((20, 9), 1)[0]
    p = SubspaceProjector(4, proj_type="left", rand_ratio=1.0)
    low = p.project(g, 0)
    u, s, vh = torch.linalg.svd(g)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(p.project_back(low), best, atol=1e-5)


def test_projector_schedule_and_random_basis():
    p = SubspaceProjector(3, update_proj_gap=10, proj_type="std", rand_ratio=0.5, total_steps=100, seed=5)
    modes = []
    for step, g in enumerate(grads((30, 8), 100, seed=2)):
        if p.needs_refresh(step):
            p.refresh(g, step)
            modes.append((step, p.last_mode))
        p.project(g)
    assert modes == [(s, "svd" if s < 50 else "random") for s in range(0, 100, 10)]
    # random bases: orthonormal, on the right side (30 >= 8: right, n x r), reproducible
    assert p.basis.shape == (8, 3)
    assert torch.allclose(p.basis.mT @ p.basis, torch.eye(3), atol=1e-6)
    q = SubspaceProjector(3, update_proj_gap=10, rand_ratio=0.0, seed=5)
    a = q.compute_basis(torch.randn(30, 8), 0)
    assert torch.equal(a, SubspaceProjector(3, rand_ratio=0.0, seed=5).compute_basis(torch.randn(30, 8), 0))
    assert not torch.equal(a, SubspaceProjector(3, rand_ratio=0.0, seed=5, stream=1).compute_basis(
        torch.randn(30, 8), 0))


def test_moment_transfer():
    p = SubspaceProjector(3, proj_type="left", rand_ratio=0.0, seed=1)
    g = torch.randn(10, 6)
    p.refresh(g, 0)
    old = p.basis.clone()
    m_old = torch.randn(3, 6)
    # same subspace, columns permuted and sign-flipped: full-space moments unchanged
    perm = old[:, [2, 0, 1]] * torch.tensor([1.0, -1.0, 1.0])
    p.basis = perm
    m_new = p.transfer(m_old, old)
    assert torch.allclose(p.basis @ m_new, old @ m_old, atol=1e-6)
    v_old = torch.rand(3, 6)
    v_new = p.transfer(v_old, old, squared=True)
    assert torch.allclose(v_new, v_old[[2, 0, 1]], atol=1e-6)
    # a new subspace: the first moment becomes the projection of the old one onto it
    p.refresh(g, 1)
    m_new = p.transfer(m_old, old)
    full_old = old @ m_old
    assert torch.allclose(p.basis @ m_new, p.basis @ (p.basis.mT @ full_old), atol=1e-5)
    # right side
    r = SubspaceProjector(2, proj_type="right", rand_ratio=0.0, seed=3)
    r.refresh(torch.randn(9, 7), 0)
    old_r = r.basis.clone()
    m_old = torch.randn(9, 2)
    r.refresh(torch.randn(9, 7), 1)
    m_new = r.transfer(m_old, old_r)
    assert torch.allclose(m_new @ r.basis.mT, (m_old @ old_r.mT) @ r.basis @ r.basis.mT, atol=1e-5)


def test_projector_bad_input():
    with pytest.raises(ValueError, match="rank"):
        SubspaceProjector(0)
    with pytest.raises(ValueError, match="rank"):
        SubspaceProjector(-1)
    with pytest.raises(ValueError, match="proj_type"):
        SubspaceProjector(2, proj_type="full")
    with pytest.raises(ValueError, match="total_steps"):
        SubspaceProjector(2, rand_ratio=0.5)
    with pytest.raises(ValueError, match="rand_ratio"):
        SubspaceProjector(2, rand_ratio=1.5)
    with pytest.raises(ValueError, match="update_proj_gap"):
        SubspaceProjector(2, update_proj_gap=0)
    p = SubspaceProjector(5)
    with pytest.raises(ValueError, match="exceeds min"):
        p.project(torch.randn(4, 10), 0)
    with pytest.raises(ValueError, match="2-D"):
        p.project(torch.randn(10), 0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        SubspaceProjector(2, rand_ratio=1.0).project(torch.full((4, 4), float("nan")), 0)


# ---------------------------------------------------------------------------
# GoLoreAdamW

def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5))
    return model.to(dtype)


def batches(n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=gen).to(dtype), torch.randn(8, 5, generator=gen).to(dtype))
            for _ in range(n)]


def train(model, opt, data):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = ((model(x).float() - y.float()) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_without_projection_is_adamw():
    a, b = mlp(), mlp()
    opt_a = GoLoreAdamW(a.parameters(), lr=1e-2, weight_decay=0.1, rank=None)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    data = batches(8)
    train(a, opt_a, data)
    train(b, opt_b, data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6, rtol=1e-5)


def reference_galore_adamw(params, data_grads, lr, betas, eps, wd, rank, gap, scale):
    """Straight from the math: per 2-D parameter with min dim > rank, SVD basis P of the
    gradient every `gap` steps (left if m < n else right), Adam on the projected gradient with
    the first moment carried by C = P_new^T P_old and the second by C*C, update scale*P N."""
    state = {}
    for step, gs in enumerate(data_grads):
        for i, (p, g) in enumerate(zip(params, gs)):
            s = state.setdefault(i, {"t": 0})
            proj = p.dim() == 2 and min(p.shape) > rank
            if proj:
                left = p.shape[0] < p.shape[1]
                if step % gap == 0:
                    u, _, vh = torch.linalg.svd(g, full_matrices=False)
                    new = u[:, :rank] if left else vh[:rank].mT
                    if "P" in s:
                        c = new.mT @ s["P"]
                        if left:
                            s["m"], s["v"] = c @ s["m"], (c * c) @ s["v"]
                        else:
                            s["m"], s["v"] = s["m"] @ c.mT, s["v"] @ (c * c).mT
                    s["P"] = new
                r = s["P"].mT @ g if left else g @ s["P"]
            else:
                r = g
            if "m" not in s:
                s["m"], s["v"] = torch.zeros_like(r), torch.zeros_like(r)
            s["t"] += 1
            s["m"] = betas[0] * s["m"] + (1 - betas[0]) * r
            s["v"] = betas[1] * s["v"] + (1 - betas[1]) * r * r
            n = (s["m"] / (1 - betas[0] ** s["t"])) / ((s["v"] / (1 - betas[1] ** s["t"])).sqrt() + eps)
            if proj:
                n = scale * (s["P"] @ n if left else n @ s["P"].mT)
            p.mul_(1 - lr * wd).add_(n, alpha=-lr)


def test_matches_step_by_step_reference():
    torch.manual_seed(0)
    shapes = [(20, 12), (6, 30), (9,), (4, 4)]
    params = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    ref = [p.clone() for p in params]
    steps = 9
    gen = torch.Generator().manual_seed(1)
    all_grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    opt = GoLoreAdamW(ours, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, rank=4,
                      update_proj_gap=3, scale=0.5, rand_ratio=1.0)
    for gs in all_grads:
        for p, g in zip(ours, gs):
            p.grad = g.clone()
        opt.step()
    reference_galore_adamw(ref, all_grads, 0.05, (0.8, 0.95), 1e-6, 0.01, 4, 3, 0.5)
    for a, b in zip(ours, ref):
        assert torch.allclose(a.detach(), b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transfer", ["rotate", "reset", "keep"])
def test_state_dict_resume_identical(dtype, transfer):
    kw = dict(lr=1e-2, weight_decay=0.01, rank=3, update_proj_gap=3, scale=0.5, rand_ratio=0.5,
              total_steps=12, moment_transfer=transfer, seed=11)
    data = batches(12, seed=3, dtype=dtype)
    model = mlp(dtype=dtype)
    opt = GoLoreAdamW(model.parameters(), **kw)
    train(model, opt, data[:5])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    full = train(model, opt, data[5:])
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = mlp(seed=99, dtype=dtype)
    model2.load_state_dict(saved["model"])
    opt2 = GoLoreAdamW(model2.parameters(), **{**kw, "seed": 0})  # seed restored from the state
    opt2.load_state_dict(saved["opt"])
    for s in opt2.state.values():
        assert s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
    resumed = train(model2, opt2, data[5:])
    assert resumed == full
    for a, b in zip(model.parameters(), model2.parameters()):
        assert a.dtype == dtype and torch.equal(a, b)
    # the run crossed refreshes of both kinds
    modes = {s["projector"].last_mode for s in opt2.state.values() if "projector" in s}
    assert modes == {"random"}


def test_bf16_params_fp32_state_tracks_fp32_run():
    data = batches(10, seed=4)
    m32, m16 = mlp(), mlp(dtype=torch.bfloat16)
    kw = dict(lr=5e-3, rank=3, update_proj_gap=4, rand_ratio=0.0, seed=2)
    o32, o16 = GoLoreAdamW(m32.parameters(), **kw), GoLoreAdamW(m16.parameters(), **kw)
    l32 = train(m32, o32, data)
    l16 = train(m16, o16, [(x.bfloat16(), y.bfloat16()) for x, y in data])
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in o16.state.values())
    for a, b in zip(m32.parameters(), m16.parameters()):
        # bf16 keeps 8 bits: the trajectories agree to a few bf16 ulps of the weights
        assert float((a - b.float()).abs().max()) < 0.05
    assert abs(l32[-1] - l16[-1]) < 0.05 * l32[0]


def counterexample(rand_ratio, steps=300):
    """GoLore's counterexample in miniature: f(W) = 1/2 ||W - W*||^2 with W* supported on the
    top-left block, stochastic gradients G + noise where the noise (random signs, norm 10x the
    signal) lives on two coordinates orthogonal to the signal. The rank-2 SVD of each stochastic
    gradient is the noise subspace, so GaLore's projected gradient has no signal; random
    projections see the signal in expectation."""
    torch.manual_seed(0)
    w_star = torch.zeros(8, 8)
    w_star[:4, :4] = torch.randn(4, 4)
    w = torch.nn.Parameter(torch.zeros(8, 8))
    opt = GoLoreAdamW([w], lr=0.05, rank=2, update_proj_gap=10, scale=1.0, proj_type="left",
                      rand_ratio=rand_ratio, seed=1)
    gen = torch.Generator().manual_seed(2)
    f0 = 0.5 * float(((w - w_star) ** 2).sum())
    for _ in range(steps):
        xi = torch.randint(0, 2, (2,), generator=gen).float() * 2 - 1
        noise = torch.zeros(8, 8)
        noise[6, 6], noise[7, 7] = 10 * xi[0], 10 * xi[1]
        w.grad = (w.detach() - w_star) + noise
        opt.step()
    return f0, 0.5 * float(((w.detach() - w_star) ** 2).sum())


def test_golore_counterexample():
    f0, f_galore = counterexample(rand_ratio=1.0)
    _, f_golore = counterexample(rand_ratio=0.0)
    assert f_galore > 0.95 * f0  # SVD projection stalls
    assert f_golore < 0.3 * f0  # random projection converges


def test_optimizer_bad_input():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="moment_transfer"):
        GoLoreAdamW([w], moment_transfer="drop")
    with pytest.raises(ValueError, match="total_steps"):
        GoLoreAdamW([w], rand_ratio=0.3)
    with pytest.raises(ValueError, match="proj_type"):
        GoLoreAdamW([w], proj_type="diag")
    with pytest.raises(ValueError, match="lr"):
        GoLoreAdamW([w], lr=-1.0)


# ---------------------------------------------------------------------------
# DDP: 2 gloo processes on CPU

def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist  # noqa: PLC0415

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = mlp(seed=0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # different global RNG per rank: the seed must be broadcast
        opt = GoLoreAdamW(ddp.parameters(), lr=1e-2, rank=3, update_proj_gap=2, rand_ratio=0.5,
                          total_steps=6)
        data = batches(6, seed=10 + rank)  # different data per rank
        train(ddp, opt, data)
        torch.save({"params": [p.detach() for p in model.parameters()], "seed": opt.seed},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # all collectives done on both ranks before teardown
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes():
    import torch.multiprocessing as mp  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0 = torch.load(os.path.join(tmp, "rank0.pt"))
        r1 = torch.load(os.path.join(tmp, "rank1.pt"))
    assert r0["seed"] == r1["seed"]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    # and the same as one process stepping on the averaged gradient of both ranks' batches
    model = mlp(seed=0)
    torch.manual_seed(0)
    opt = GoLoreAdamW(model.parameters(), lr=1e-2, rank=3, update_proj_gap=2, rand_ratio=0.5,
                      total_steps=6, seed=r0["seed"])
    d0, d1 = batches(6, seed=10), batches(6, seed=11)
    for (x0, y0), (x1, y1) in zip(d0, d1):
        opt.zero_grad()
        loss = 0.5 * (((model(x0) - y0) ** 2).mean() + ((model(x1) - y1) ** 2).mean())
        loss.backward()
        opt.step()
    for a, b in zip(model.parameters(), r0["params"]):
        assert torch.allclose(a.detach(), b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# ReLoRA-style refresh of a peft LoRA model

def tiny_lora_model(seed=0):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def lora_pairs(model):
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("mode", ["random", "svd"])
def test_relora_refresh(mode):
    from llmopt_ext.optim import lora_full_grads, relora_refresh  # noqa: PLC0415

    model = tiny_lora_model()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    layers = lora_pairs(model)
    old = {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
               {k: opt.state[m.lora_B["default"].weight][k].clone() for k in ("exp_avg", "exp_avg_sq")})
           for n, m in layers}
    full = None
    if mode == "svd":
        full = lora_full_grads(model, lambda: lm_loss(model, ids).backward())
        opt.zero_grad()
        assert set(full) == {n for n, _ in layers}
        assert all(not m.get_base_layer().weight.requires_grad for _, m in layers)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    n = relora_refresh(model, opt, mode=mode, full_grads=full, seed=3)
    assert n == len(layers) == 2
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)  # merged: the function is unchanged
    for name, m in layers:
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        assert torch.count_nonzero(b) == 0
        assert torch.allclose(a @ a.mT, torch.eye(a.shape[0]), atol=1e-5)  # orthonormal rows
        if mode == "svd":
            vh = torch.linalg.svd(full[name])[2][: a.shape[0]]
            assert torch.allclose((vh @ a.mT).abs(), torch.eye(a.shape[0]), atol=1e-4)
        a_old, _, st_old = old[name]
        st = opt.state[b]
        # first moment: the old full-space moment projected on the new row space
        m_full = st_old["exp_avg"] @ torch.linalg.solve(a_old @ a_old.mT, a_old)
        want = m_full @ a.mT
        assert torch.allclose(st["exp_avg"], want, atol=1e-6), (st["exp_avg"] - want).abs().max()
        assert torch.all(st["exp_avg_sq"] >= 0)
        assert torch.count_nonzero(opt.state[a]["exp_avg"]) == 0  # A's state reset
    # training continues from the merged weights
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_relora_refresh_bad_input():
    from llmopt_ext.optim import relora_refresh  # noqa: PLC0415

    model = tiny_lora_model()
    with pytest.raises(ValueError, match="full_grads"):
        relora_refresh(model, mode="svd")
    with pytest.raises(ValueError, match="mode"):
        relora_refresh(model, mode="qr")
    with pytest.raises(KeyError, match="no gradient"):
        relora_refresh(model, mode="svd", full_grads={})
