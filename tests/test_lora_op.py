"""The fused lora_linear op itself: bf16 accuracy against peft (one layer and a real
Llama checkpoint, float64 peft as the oracle), the rank-r CPU kernels and their Philox
dropout contract, the bytes autograd keeps with dropout, the fake / opcheck, and the
in_features=0 error on every backend."""
from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU (small shapes)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmopt_ext import backend, ops  # noqa: E402
from llmopt_ext.ops import lora as lora_mod  # noqa: E402
from llmopt_ext.ops import reference  # noqa: E402

from conftest import backend_params, kernels_loaded  # noqa: E402

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as peft_layer  # noqa: E402

from llmopt_ext import nn as lnn  # noqa: E402

needs_c = pytest.mark.skipif(not kernels_loaded(), reason="llmopt_ext._C not built")
TRITON_OK = backend.unavailable_reason("triton") is None


def _layer(in_f, out_f, r, adt, dropout=0.0, seed=0, b_std=0.02):
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
    base.weight.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout)
    layer = peft_layer.Linear(base, "default", config=cfg, r=r, lora_alpha=2 * r)
    layer.lora_A["default"].to(adt)
    layer.lora_B["default"].to(adt)
    with torch.no_grad():  # peft's B = 0 init would hide every adapter error
        layer.lora_B["default"].weight.normal_(0, b_std)
    fused = copy.deepcopy(layer)
    lnn.fuse_lora(fused)
    return layer, fused


def _grads(layer, x, gy, autocast):
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(gy.to(y.dtype))
    return [y, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@needs_c
@pytest.mark.parametrize("adt", [torch.float32, torch.bfloat16], ids=["fp32_adapters", "bf16_adapters"])
def test_layer_bf16_rounds_y_and_dx_once(adt):
    """bf16 activations: y and dX are rounded once (the low-rank term is added inside the base
    GEMM's accumulator), so their error against float64 is 0.73-0.87x peft's (measured), which rounds
    the base product and then the sum (it was 0.99x peft's before). dA, dB: float32 products."""
    plain, fused = _layer(512, 384, 16, adt, b_std=0.05)
    oracle = copy.deepcopy(plain).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 512, generator=g).bfloat16()
    gy = torch.randn(96, 384, generator=g).bfloat16()
    want = [t.double() for t in _grads(oracle, x.double(), gy.double(), False)]
    for autocast in (False, True):  # bf16 model, or the same values under autocast
        got_peft, got = _grads(plain, x, gy, autocast), _grads(fused, x, gy, autocast)
        for name, o, p, w in zip(("y", "dx", "dA", "dB"), got, got_peft, want):
            err, err_peft = _rel(o, w), _rel(p, w)
            bound = 0.9 * err_peft if name in ("y", "dx") else max(err_peft, 1e-5)
            assert err <= bound, f"{name} autocast={autocast}: fused {err:.3g} peft {err_peft:.3g}"


# ---------------------------------------------------------------------------
# real checkpoint under bf16 autocast

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def real_lora_models(real_model_dir):
    """SmolLM2-135M (Llama), LoRA r=8 on every projection with fp32 adapters (peft's default),
    B drawn N(0, 0.02) (peft's B = 0 would hide every adapter error): (peft, fused, float64
    peft oracle), the fp32 models being identical copies."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    plain = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    fused = copy.deepcopy(plain)
    assert lnn.fuse_lora(fused) == 7 * model.config.num_hidden_layers
    return plain, fused, copy.deepcopy(plain).double()


def test_real_model_bf16_autocast_vs_peft(real_lora_models):
    """2 x 32 tokens under bf16 autocast, float64 peft as the oracle, forward and backward.
    The fused model's last hidden state is closer to the oracle than peft's (measured
    0.67-0.95x over 5 batches), and so are its worst and its median per-tensor LoRA-gradient
    error (0.37 vs 0.45, 0.035 vs 0.045; it was 0.70 vs 0.45 before y was rounded once).
    The loss is compared in test_real_model_bf16_loss_vs_peft (per token, over 1024 tokens)."""
    plain, fused, oracle = real_lora_models
    n_layers = plain.config.num_hidden_layers
    ids = torch.randint(0, plain.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))

    def run(m, autocast):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = m(input_ids=ids, labels=ids, output_hidden_states=True)
        out.loss.backward()
        grads = {n: p.grad.double() for n, p in m.named_parameters() if p.requires_grad}
        return out.loss.item(), out.hidden_states[-1].detach().double(), grads

    loss_ref, h_ref, g_ref = run(oracle, False)
    lnn.reset_fallback_counts()
    (loss_p, h_p, g_p), (loss_f, h_f, g_f) = run(plain, True), run(fused, True)
    assert lnn.fallback_counts() == {}
    rel = lambda h: ((h - h_ref).norm() / h_ref.norm()).item()  # noqa: E731
    assert rel(h_f) <= rel(h_p), (rel(h_f), rel(h_p))
    err = {n: ((g_f[n] - w).abs().max() / w.abs().max()).item() for n, w in g_ref.items()}
    err_p = {n: ((g_p[n] - w).abs().max() / w.abs().max()).item() for n, w in g_ref.items()}
    assert len(err) == 2 * 7 * n_layers
    assert max(err.values()) <= max(err_p.values()), (max(err.values()), max(err_p.values()))
    med = lambda d: sorted(d.values())[len(d) // 2]  # noqa: E731
    assert med(err) <= med(err_p), (med(err), med(err_p))
    assert abs(loss_f - loss_ref) <= 1e-2 * abs(loss_ref), (loss_f, loss_p, loss_ref)  # a sanity bound only


def test_real_model_bf16_loss_vs_peft(real_lora_models):
    """The loss under bf16 autocast against the float64 oracle, 2 batches of 16 x 32 tokens.

    1. Every one of the 210 LoRA layers, fed the oracle's own input (rounded to bf16, as both
       layers see it), is closer to the float64 layer than peft's layer is: summed over the
       512 token rows (measured 0.70-0.96x), and row by row on >= 90% of the rows of every
       layer (measured: >= 92.4% in every layer, 99.9% of all rows; worst row 1.34x).
    2. The per-token loss error: its median over the 1024 tokens is below peft's (measured
       below on 6 of 6 batches of 512 tokens, by 1-17%).

    What is not asserted, and why: the batch-mean loss error of one batch. Measured on 6
    batches of 16 x 32 tokens it was below peft's on 4 (mean over the 6: 2.7e-4 vs 3.2e-4
    relative); on 2 x 32-token batches the two swap places from batch to batch (fused 10x
    worse on one, 15x better on another). The per-token errors are heavy-tailed: a rounding
    difference at an early position of a sequence is amplified through the later layers into
    one token's loss (1.7 nats on one token of one batch for fused, 0.35 for peft on
    another), and one such token decides a batch mean. The local errors (1.) are what the
    fused layer controls, and they are smaller everywhere."""
    from peft.tuners.lora import layer as pl

    plain, fused, oracle = real_lora_models
    gen = torch.Generator().manual_seed(100)
    batches = [torch.randint(0, plain.config.vocab_size, (16, 32), generator=gen) for _ in range(2)]
    o_mods, p_mods, f_mods = (dict(m.named_modules()) for m in (oracle, plain, fused))
    names = [n for n, m in o_mods.items() if isinstance(m, pl.Linear)]
    assert len(names) == 7 * plain.config.num_hidden_layers

    # 1. each layer on the oracle's input
    seen = {}
    hooks = [o_mods[n].register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, a[0].detach()))
             for n in names]
    try:
        with torch.no_grad():
            oracle(input_ids=batches[0])
    finally:
        for h in hooks:
            h.remove()
    for n in names:
        xb = seen[n].to(torch.bfloat16)
        with torch.no_grad():
            want = o_mods[n](xb.double()).reshape(-1, o_mods[n].out_features)
            with torch.autocast("cpu", torch.bfloat16):
                y_p, y_f = p_mods[n](xb.float()), f_mods[n](xb.float())
        err_p = (y_p.double().reshape(want.shape) - want).norm(dim=1)
        err_f = (y_f.double().reshape(want.shape) - want).norm(dim=1)
        assert err_f.sum() <= err_p.sum(), (n, err_f.sum().item(), err_p.sum().item())
        rows_better = (err_f <= err_p).double().mean().item()
        assert rows_better >= 0.9, (n, rows_better, (err_f / err_p).max().item())

    # 2. the per-token loss error
    def token_loss(m, autocast, ids):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            logits = m(input_ids=ids).logits.double()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="none")

    lnn.reset_fallback_counts()
    d_p, d_f = [], []
    for ids in batches:
        ref = token_loss(oracle, False, ids)
        d_p.append((token_loss(plain, True, ids) - ref).abs())
        d_f.append((token_loss(fused, True, ids) - ref).abs())
    assert lnn.fallback_counts() == {}
    med_p, med_f = torch.cat(d_p).median().item(), torch.cat(d_f).median().item()
    assert med_f <= med_p, (med_f, med_p)


# ---------------------------------------------------------------------------
# the rank-r CPU kernels

def _inv_keep(p: float) -> float:
    """The kernels' dropout scale: 1 / (1 - p) evaluated in float32 (as torch's dropout)."""
    return (torch.tensor(1.0) / (1 - torch.tensor(p))).item()


def _philox_keep(seed: int, p: float, m: int, k: int) -> torch.Tensor:
    """The dropout contract of csrc/cpu/lora_dropout.h, in pure PyTorch (uint32 in int64)."""
    i = torch.arange(m * k, dtype=torch.int64)
    blk = i // 4
    u = reference.philox4x32(blk & 0xFFFFFFFF, blk >> 32, torch.full_like(blk, 0x10AA), torch.zeros_like(blk),
                             seed & 0xFFFFFFFF, seed >> 32)
    word = torch.stack(u, -1).gather(-1, (i % 4)[:, None])[:, 0]
    return (word >= int(p * 2**32)).reshape(m, k)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_kernel_follows_the_philox_contract(dtype, p):
    """Ragged sizes (K = 37 not a multiple of 4: mask blocks straddle rows), a row stride > K,
    mask from the documented Philox contract, scaled and rounded once."""
    g = torch.Generator().manual_seed(0)
    m, k, seed = 9, 37, 12345
    x = torch.randn(m, k + 3, generator=g).to(dtype)[:, :k]  # row stride k + 3
    keep = _philox_keep(seed, p, m, k) if p else torch.ones(m, k, dtype=torch.bool)
    xd = x.double() * keep * _inv_keep(p)
    t = x.clone()
    torch.ops.llmopt_ext.lora_dropout_mul_(t, seed, p)
    assert torch.equal(t, xd.to(dtype)), "mask * 1/(1-p) rounded once"
    if p:
        assert abs(keep.double().mean().item() - (1 - p)) < 0.1


@needs_c
@pytest.mark.parametrize("rows", [(0, 1), (1, 4), (3, 9), (0, 9)])
def test_dropout_kernel_row_blocks_get_their_part_of_the_whole_mask(rows):
    """A block of rows i..j masked at offset i * K equals those rows of the whole tensor's
    mask (the row-blocked rank-r products of ops/lora.py rely on it); K = 37 makes the
    block start inside a Philox counter block."""
    m, k, seed, p = 9, 37, 99, 0.4
    x = torch.randn(m, k)
    whole = x.clone()
    torch.ops.llmopt_ext.lora_dropout_mul_(whole, seed, p)
    i, j = rows
    blk = x[i:j].clone()
    torch.ops.llmopt_ext.lora_dropout_mul_(blk, seed, p, i * k)
    assert torch.equal(blk, whole[i:j])


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_blocked_rank_r_products_with_dropout_match_float64(dtype, monkeypatch):
    """_down / _reduce with dropout over several row blocks (a ragged last one) against the
    float64 product of the contract's mask."""
    from llmopt_ext.ops import lora as lora_ops
    monkeypatch.setattr(lora_ops, "_UPCAST_BLOCK_ELEMS", 4 * 37)  # 4 rows per block
    g = torch.Generator().manual_seed(1)
    m, k, r, seed, p = 10, 37, 5, 4321, 0.25
    x = torch.randn(m, k, generator=g).to(dtype)
    q = torch.randn(k, r, generator=g)
    gm = torch.randn(m, r, generator=g)
    xd = x.double() * _philox_keep(seed, p, m, k) * _inv_keep(p)
    torch.testing.assert_close(lora_ops._down(x, q, 0.5, seed, p).double(), 0.5 * xd @ q.double(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora_ops._reduce(gm, x, seed, p, torch.float32).double(),
                               gm.double().t() @ xd, rtol=1e-5, atol=1e-5)


@needs_c
def test_dropout_kernel_rejects_bad_input():
    x = torch.randn(4, 8)
    t = x.clone()
    with pytest.raises(ValueError, match="unit column stride"):
        torch.ops.llmopt_ext.lora_dropout_mul_(t.t(), 0, 0.5)
    with pytest.raises(ValueError, match="dropout_p"):
        torch.ops.llmopt_ext.lora_dropout_mul_(t, 0, 1.0)
    with pytest.raises(ValueError, match="offset"):
        torch.ops.llmopt_ext.lora_dropout_mul_(t, 0, 0.5, -1)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.llmopt_ext.lora_dropout_mul_(t.double(), 0, 0.5)
    assert torch.equal(t, x), "nothing written when rejected"


# ---------------------------------------------------------------------------
# memory with dropout

def _saved_bytes(fn, params) -> int:
    """Bytes autograd keeps for backward (distinct storages, parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key[0] not in skip and key not in seen:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@needs_c
@pytest.mark.parametrize("adt", [torch.float32, torch.bfloat16], ids=["fp32_adapters", "bf16_adapters"])
def test_dropout_saves_no_mask(adt):
    """With dropout the fused layer keeps x, the (tokens x r) float32 t and the seed: nothing
    of x's size besides x (it kept a bool mask before: 1.5x x's bytes). peft keeps x, the mask
    and the dropped activations."""
    plain, fused = _layer(256, 192, 16, adt, dropout=0.1)
    plain.train(), fused.train()
    x = torch.randn(128, 256, dtype=torch.bfloat16, requires_grad=True)
    ours = _saved_bytes(lambda: fused(x), fused.parameters())
    theirs = _saved_bytes(lambda: plain(x), plain.parameters())
    limit = x.numel() * x.element_size() + 128 * 16 * 4 + 64
    assert ours <= limit, (ours, limit)
    assert ours <= theirs, (ours, theirs)


@needs_c
def test_dropout_backward_uses_forward_mask():
    """The mask regenerated in backward is the forward's, in an autocast layer with fp32
    adapters: gradients equal float64 math on the mask the forward applied (read off y)."""
    n, p = 24, 0.4
    w = torch.zeros(n, n, dtype=torch.bfloat16)
    a = torch.eye(n, requires_grad=True)
    b = torch.eye(n, requires_grad=True)
    x = (torch.rand(40, n) + 0.5).bfloat16().requires_grad_()
    torch.manual_seed(3)
    with backend.use("cpu"):
        y = ops.lora_linear(x, w, None, a, b, 1.0, dropout_p=p, training=True)
    keep = y != 0
    gy = torch.randn(40, n).bfloat16()
    dx, da, db = torch.autograd.grad(y, (x, a, b), gy)
    xd = x.detach().double() * keep * _inv_keep(p)
    want_dx = gy.double() * keep * _inv_keep(p)  # rounded once into bf16: within half an ulp
    assert ((dx.double() - want_dx).abs() <= want_dx.abs() * 2.0**-8).all()
    torch.testing.assert_close(da.double(), gy.double().t() @ xd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), gy.double().t() @ xd, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# fake, opcheck, errors

def _op_args(fi=False, bias=True, drop=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 24, generator=g)
    w = torch.randn((24, 18) if fi else (18, 24), generator=g)
    a = torch.randn(4, 24, generator=g).requires_grad_()
    b = torch.randn(18, 4, generator=g).requires_grad_()
    bb = torch.randn(18, generator=g).requires_grad_() if bias else None
    seed = torch.tensor([7]) if drop else None
    return (x.requires_grad_(), w, bb, a, b, None, 0.5, seed, 0.2 if drop else 0.0, fi)


@needs_c
@pytest.mark.parametrize("fi,bias,drop", [(False, True, False), (True, False, True)])
def test_cpu_op_opcheck(fi, bias, drop):
    torch.library.opcheck(lora_mod.lora_linear_cpu_fwd, _op_args(fi, bias, drop),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))


def test_fake_checks_devices_and_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, bb, a, b, *rest = _op_args()
    with FakeTensorMode(allow_non_fake_inputs=True):
        y, t = lora_mod.fused_forward_fake(x, w, bb, a, b, *rest)
        assert y.shape == (20, 18) and t.shape == (20, 4) and t.dtype == torch.float32
        with pytest.raises(RuntimeError, match="tensors on meta"):
            lora_mod.fused_forward_fake(x, w, bb, a, b.to("meta"), *rest)
        with pytest.raises(RuntimeError, match="lora_A"):
            lora_mod.fused_forward_fake(x, w, bb, a[:, :20], b, *rest)


_BACKENDS = ["reference", pytest.param("cpu", marks=needs_c),
             pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="no triton"))]


@pytest.mark.parametrize("b", _BACKENDS)
def test_in_features_zero_same_error_everywhere(b):
    x, w, a, bb = torch.randn(3, 0), torch.randn(5, 0), torch.randn(2, 0), torch.randn(5, 2)
    with backend.use(b):
        with pytest.raises(ValueError, match=r"lora_linear: in_features is 0"):
            ops.lora_linear(x, w, None, a, bb, 1.0)


@pytest.mark.parametrize("b", _BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_adapter_backward_x_only(b, dtype):
    """Only x needs a gradient (the adapter frozen, e.g. another adapter trains): dX alone,
    equal to the float64 reference's. The CPU bwd op once returned one shared empty tensor
    for dA and dB here, which torch rejects as aliased outputs of a custom op."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 12, generator=g).to(dtype).requires_grad_()
    w = torch.randn(7, 12, generator=g).to(dtype)
    a, bb = torch.randn(4, 12, generator=g), torch.randn(7, 4, generator=g)
    dy = torch.randn(9, 7, generator=g).to(dtype)
    with backend.use(b):
        ops.lora_linear(x, w, None, a, bb, 0.5).backward(dy)
    x64 = x.detach().double().requires_grad_()
    (x64 @ w.double().t() + 0.5 * (x64 @ a.double().t()) @ bb.double().t()).backward(dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert a.grad is None and bb.grad is None
    assert torch.allclose(x.grad.double(), x64.grad, rtol=tol, atol=tol)


@needs_c
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_double_backward_matches_reference(p):
    """create_graph=True (Hessian-vector products of AdaHessian / SophiaH / TRCG): the second
    derivative goes through the composed backward (the custom bwd op has no derivative; this
    failed with "no autograd formula" in the CLI's sophiah run). It matches float64 autograd
    with the same dropout mask (regenerated from the seed lora_linear draws)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(7, 10, generator=g)
    a = torch.randn(3, 10, generator=g).requires_grad_()
    b = torch.randn(7, 3, generator=g).requires_grad_()
    v = [torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g)]

    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # the draw lora_linear makes
    mask = torch.ones(6, 10)
    if p:
        torch.ops.llmopt_ext.lora_dropout_mul_(mask, seed, p)
    mask = mask.double()

    def hvp(fn, leaves):
        ga, gb = torch.autograd.grad(fn().square().sum(), leaves[1:], create_graph=True)
        return torch.autograd.grad((ga * v[0]).sum() + (gb * v[1]).sum(), leaves)

    def fused():
        torch.manual_seed(5)
        with backend.use("cpu"):
            return ops.lora_linear(x, w, None, a, b, 0.5, dropout_p=p, training=True)

    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, b)]
    x64, a64, b64 = leaves64
    want = hvp(lambda: x64 @ w.double().t() + 0.5 * ((x64 * mask) @ a64.t()) @ b64.t(), leaves64)
    for got, ref in zip(hvp(fused, [x, a, b]), want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# lora_merge_: W +/- D rounded once, where a float32 shortcut would not be

def _merge_midpoint_pairs(dtype):
    """(W, D) pairs whose float32 sum lands exactly on a rounding midpoint of `dtype` with a
    nonzero error of either sign (and with none), plus pairs where the float64 sum of the
    contract itself collapses onto a midpoint (bf16: a tiny W next to a D that is one) or,
    for fp16, subnormal midpoints."""
    g = torch.Generator().manual_seed(11)
    drop = 16 if dtype == torch.bfloat16 else 13  # float32 bits below the dtype's last bit
    w = (torch.randn(512, generator=g) * 4.0 ** torch.randint(-6, 7, (512,), generator=g)).to(dtype)
    wf = w.float()
    ws, ds = [], []
    for up in (1, -1):  # the midpoint just above / below w in magnitude
        m = (wf.view(torch.int32) + up * (1 << (drop - 1))).view(torch.float32)
        half = m.double() - wf.double()
        for t in (0.0, 2.0**-30, -(2.0**-30), 2.0**-45, -(2.0**-45)):
            ws.append(w)
            ds.append((half + t * wf.double().abs()).float())
    if dtype == torch.bfloat16:
        tiny = torch.tensor([2.0**-70, -(2.0**-70), 2.0**-100, -(2.0**-120)])
        mids = torch.tensor([1 + 2.0**-8, -(1 + 3 * 2.0**-8), 3 + 2.0**-6, 2.0**40 * (1 + 5 * 2.0**-8)])
    else:
        tiny = torch.arange(8) * 2.0**-24
        mids = torch.tensor([2.0**-25, -(2.0**-25), 2.0**-25 + 2.0**-40, 2.0**-25 - 2.0**-40])
    ws.append(tiny.repeat_interleave(len(mids)).to(dtype))
    ds.append(mids.repeat(len(tiny)).float())
    return torch.cat(ws), torch.cat(ds)


@pytest.mark.parametrize("b,device", backend_params("lora_merge_"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_rounds_midpoints_like_the_float64_contract(b, device, dtype):
    """D lands W + D exactly on a bf16/fp16 midpoint with a float32 error of either sign:
    the result must be the float64 contract's single rounding (round-to-odd, then RNE), not
    the float32 sum's (which ties to even), nor the exact sum's (which differs where the
    float64 sum already collapsed onto the midpoint: W = 2^-70, D = 1 + 2^-8 gives 1.0)."""
    w, d = _merge_midpoint_pairs(dtype)
    n = w.numel() // 4 * 4
    w, d = w[:n].reshape(4, -1), d[:n].reshape(4, -1)
    lora_a, lora_b = d.clone(), torch.eye(4)  # B A = D exactly (one nonzero term per element)
    want = w.clone()
    reference.lora_merge_(want, lora_a, lora_b, 1.0)
    naive = (w.float() + d).to(dtype)  # the float32 sum rounded: ties to even
    assert not torch.equal(naive, want)
    if dtype == torch.bfloat16:
        tiny_vs_mid = (w.float().abs() < 2.0**-60) & ((d - 1 - 2.0**-8).abs() == 0)
        assert tiny_vs_mid.any() and (want.float()[tiny_vs_mid] == 1.0).all()
    for sign in (1, -1):
        got = w.clone().to(device)
        with backend.use(b):
            (ops.lora_merge_ if sign > 0 else ops.lora_unmerge_)(got, lora_a.to(device), lora_b.to(device), 1.0)
        ref = w.clone()
        (reference.lora_merge_ if sign > 0 else reference.lora_unmerge_)(ref, lora_a, lora_b, 1.0)
        assert torch.equal(got.cpu().view(torch.int16), ref.view(torch.int16)), sign
