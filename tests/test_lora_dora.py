"""DoRA (``use_dora=True``) on the fused LoRA layer against peft's own DoRA layer: the
low-rank weight norm against the materialised one, forward and every gradient (x, bias,
lora_A, lora_B, the magnitude) in fp32 and bf16 against a float64 twin, dropout with
peft's own mask, bias on and off, fan_in_fan_out, save/load both ways, the norm cache, and
the DoRA cases that still run peft's forward (each with its reason)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as peft_layer  # noqa: E402

from llmopt_ext import nn as lnn  # noqa: E402
from llmopt_ext.ops import lora as lora_ops  # noqa: E402

from lora_twins import assert_close_to_oracle, fused_peft_oracle, run_grads, trainable  # noqa: E402

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

FUSED = {"1 adapter, DoRA": 1}


@pytest.fixture(autouse=True)
def _clean_counts():
    lnn.reset_fallback_counts()
    lnn.reset_fused_counts()
    yield


# ---------------------------------------------------------------------------
# the low-rank norm

@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fif", [False, True])
@pytest.mark.parametrize("tensor_scale", [False, True])
def test_dora_weight_norm_matches_materialised(wdt, fif, tensor_scale):
    """||W + s B A|| per output row from the low-rank expansion vs the float64 norm of the
    materialised sum: float32 accuracy (W exactly upcast), for bf16 W too."""
    g = torch.Generator().manual_seed(0)
    # several upcast row blocks of bf16 W (2^20 elements each), the last one ragged: (out, in)
    # blocks of 1048 rows (2 + 4 rows), (in, out) blocks of 499 rows (2 + 2 rows)
    out_f, in_f, r = 2100, 1000, 6
    w = torch.randn(out_f, in_f, generator=g).to(wdt)
    a = torch.randn(r, in_f, generator=g) * 0.3
    b = torch.randn(out_f, r, generator=g) * 0.3
    s = torch.tensor(1.7) if tensor_scale else 1.7
    want = torch.linalg.norm(w.double() + 1.7 * (b.double() @ a.double()), dim=1)
    stored = w.t().contiguous() if fif else w
    got = lora_ops.dora_weight_norm(stored, a, b, s, fif)
    assert got.dtype == torch.float32 and got.shape == (out_f,)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    wsq = lora_ops.weight_row_norm_sq(stored, fif)
    # the square of a float32 norm (peft's): 2 x its rounding, over 1000 terms
    torch.testing.assert_close(wsq.double(), w.double().square().sum(1), rtol=5e-6, atol=0)
    torch.testing.assert_close(lora_ops.dora_weight_norm(stored, a, b, s, fif, wsq), got, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("fif", [False, True])
@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16])
def test_dora_at_initialisation_is_exactly_the_base_layer(fif, wdt, dropout):
    """peft's default init (B = 0, magnitude = peft's ||W||): the fused DoRA output is the
    base layer's output bit for bit, as peft's is (its test_lora_use_dora_linear checks
    allclose, which near-zero outputs fail unless the rescaling is exactly 1), in training
    with dropout too."""
    torch.manual_seed(0)
    base = (Conv1D(18, 40) if fif else nn.Linear(40, 18)).to(wdt)
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=fif, lora_dropout=dropout)
    layer = peft_layer.Linear(copy.deepcopy(base), "a", config=cfg, r=4, lora_alpha=8, use_dora=True,
                              is_target_conv_1d_layer=fif, lora_dropout=dropout)
    lnn.fuse_lora(layer)
    layer.train()
    x = torch.randn(9, 40).to(wdt)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))
    assert lnn.fused_counts() == FUSED


def test_dora_weight_norm_cancelling_row_is_not_nan():
    """A row that the adapter cancels exactly (W_j = -s B_j A): the expansion's rounding
    (eps32 * ||W_j||^2 on the squared norm) may go below 0; the result is 0 or at most
    a few sqrt(eps32) ||W_j||, never NaN."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 8, generator=g)
    b = torch.randn(3, 2, generator=g)
    w = -(b @ a)
    got = lora_ops.dora_weight_norm(w, a, b, 1.0)
    assert torch.isfinite(got).all()
    assert (got <= 4 * 2.0 ** -11.5 * w.norm(dim=1)).all(), got


# ---------------------------------------------------------------------------
# the layer against peft's DoRA layer

def _dora_layer(dtype, adt, bias=True, dropout=0.0, fif=False, seed=0, in_f=24, out_f=18, r=4):
    """peft's DoRA lora.Linear with a drawn B (peft's B = 0 makes the adapter a no-op) and a
    magnitude moved off ||W + s B A|| (where it starts, making g = 1 and DoRA = LoRA)."""
    torch.manual_seed(seed)
    if fif:  # transformers' Conv1D: (in, out) weight, always a bias
        base = Conv1D(out_f, in_f)
        with torch.no_grad():
            base.weight.normal_(0, in_f ** -0.5)
            base.bias.normal_(0, 0.3)
        base = base.to(dtype)
    else:
        base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    base.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=3 * r, lora_dropout=dropout, use_dora=True, init_lora_weights=False,
                     fan_in_fan_out=fif)
    layer = peft_layer.Linear(base, "a", config=cfg, r=r, lora_alpha=3 * r, lora_dropout=dropout,
                              use_dora=True, is_target_conv_1d_layer=fif)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_(0, 0.5)
    layer.lora_A["a"].to(adt)
    layer.lora_B["a"].to(adt)
    # the magnitude as peft computes it for these A, B (peft's init computed it for B before the draw)
    layer.lora_magnitude_vector["a"].update_layer(base_layer=base, lora_A=layer.lora_A["a"].weight,
                                                  lora_B=layer.lora_B["a"].weight, scaling=layer.scaling["a"])
    with torch.no_grad():
        mag = layer.lora_magnitude_vector["a"].weight
        mag.mul_(1 + 0.5 * torch.rand(mag.shape))
    layer.lora_magnitude_vector["a"].to(adt)
    if bias:
        base.bias.requires_grad_(True)  # the bias gradient is checked too
    return layer


CASES = [  # (x/W dtype, adapter dtype, base bias, fan_in_fan_out)
    (torch.float32, torch.float32, True, False),
    (torch.float32, torch.float32, False, False),
    (torch.float32, torch.float32, True, True),
    (torch.bfloat16, torch.float32, True, False),
    (torch.bfloat16, torch.float32, True, True),  # Conv1D always has a bias
    (torch.bfloat16, torch.bfloat16, True, False),
    (torch.bfloat16, torch.bfloat16, False, False),
    (torch.float16, torch.float16, True, False),
    (torch.float16, torch.float32, True, False),
]


def _case_id(c):
    return f"{str(c[0])[6:]}-{str(c[1])[6:]}-bias{int(c[2])}" + ("-fif" if c[3] else "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_dora_matches_peft(case):
    """Eval mode (dropout configured, inactive): y and the gradients of x, the base bias,
    lora_A, lora_B and the magnitude against peft's DoRA layer and its float64 twin."""
    dtype, adt, bias, fif = case
    ref = _dora_layer(dtype, adt, bias=bias, dropout=0.2, fif=fif).eval()
    got, got_peft, want, x = fused_peft_oracle(ref, dtype, 24, 18)
    assert lnn.fallback_counts() == {}
    assert lnn.fused_counts() == FUSED
    assert len(got) == 2 + int(bias) + 3  # y, x, [bias], lora_A, lora_B, magnitude
    assert_close_to_oracle(got, got_peft, want, dtype)
    # DoRA is visible: the same adapter without the magnitude rescaling gives another y
    plain = copy.deepcopy(ref)
    del plain.lora_variant["a"]
    with torch.no_grad():
        assert (plain(x) - got[0]).abs().max() > 0.05 * got[0].abs().max()


class _FixedMask(nn.Module):
    """A dropout with a given mask (float64 twin of a training-mode nn.Dropout)."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1 - self.p)


def _record_dropout_mask(layer):
    store = {}

    def hook(module, inputs, output):
        store["mask"] = output != 0
        store["input_nonzero"] = inputs[0] != 0

    return store, layer.lora_dropout["a"].register_forward_hook(hook)


@pytest.mark.parametrize("case", CASES[:1] + CASES[3:6:2] + CASES[4:5], ids=_case_id)
def test_dora_dropout_matches_peft(case):
    """Training with dropout p = 0.3, the same seed for both: the fused layer draws peft's
    mask (its dropout module is the layer's own), and y and every gradient match the float64
    twin run with that mask within 2x peft's error."""
    dtype, adt, bias, fif = case
    p = 0.3
    ref = _dora_layer(dtype, adt, bias=bias, dropout=p, fif=fif).train()
    fused = copy.deepcopy(ref)
    lnn.fuse_lora(fused)
    x = torch.randn(3, 7, 24).to(dtype).requires_grad_()
    gy = torch.randn(3, 7, 18).to(dtype)
    peft_mask, h1 = _record_dropout_mask(ref)
    ours_mask, h2 = _record_dropout_mask(fused)
    got_peft = run_grads(ref, x, gy, seed=11)
    got = run_grads(fused, x, gy, seed=11)
    h1.remove(), h2.remove()
    assert torch.equal(ours_mask["mask"], peft_mask["mask"])
    assert not peft_mask["mask"][peft_mask["input_nonzero"]].all()  # some elements were dropped
    oracle = copy.deepcopy(ref).double()
    oracle.lora_dropout["a"] = _FixedMask(peft_mask["mask"], p)
    want = run_grads(oracle, x.detach().double().requires_grad_(), gy.double())
    assert lnn.fallback_counts() == {}
    assert lnn.fused_counts() == FUSED
    assert_close_to_oracle(got, got_peft, want, dtype)
    with torch.no_grad():  # the dropout is live: eval differs
        assert not torch.allclose(fused.eval()(x), got[0])


def test_dora_dropout_backward_uses_the_forward_mask():
    """Re-seeding reproduces the mask, so y is linear in x, the bias and the magnitude:
    <gy, y(t + v) - y(t)> equals <grad, v> up to fp32 rounding."""
    layer = _dora_layer(torch.float32, torch.float32, bias=True, dropout=0.4)
    lnn.fuse_lora(layer)
    layer.train()
    x = torch.randn(6, 24, requires_grad=True)
    gy = torch.randn(6, 18)

    def f():
        torch.manual_seed(5)
        return layer(x)

    y = f()
    mag = layer.lora_magnitude_vector["a"].weight
    bias = layer.get_base_layer().bias
    grads = torch.autograd.grad(y, [x, bias, mag], gy)
    with torch.no_grad():
        for t, g in zip([x, bias, mag], grads):
            v = torch.randn_like(t)
            t.add_(v)
            y2 = f()
            t.sub_(v)
            lhs = (gy * (y2 - y)).sum().item()
            rhs = (g * v).sum().item()
            assert abs(lhs - rhs) <= 1e-4 * (abs(rhs) + 1.0), (lhs, rhs)
    assert lnn.fallback_counts() == {}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_double_backward_matches_peft(dropout):
    """create_graph=True (Hessian-vector products): the second derivative through the fused
    DoRA path equals peft's (fp32; with dropout, training, the same seed: peft's mask)."""
    ref = _dora_layer(torch.float32, torch.float32, bias=True, dropout=dropout).train(dropout > 0)
    fused = copy.deepcopy(ref)
    lnn.fuse_lora(fused)
    x = torch.randn(5, 24)
    out = []
    for layer in (ref, fused):
        params = trainable(layer)
        torch.manual_seed(2)
        loss = layer(x).square().sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vs = [torch.ones_like(p) for p in params]
        hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), params)
        out.append(list(grads) + list(hv))
    for a, b in zip(out[1], out[0]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    assert lnn.fallback_counts() == {}


def test_dora_first_then_plain_lora_matches_peft():
    """DoRA first and a plain LoRA adapter after it (peft adds the LoRA term after the DoRA
    rescaling): fused, as peft computes it."""
    ref = _dora_layer(torch.float32, torch.float32, bias=True).eval()
    cfg = LoraConfig(r=3, lora_alpha=6, init_lora_weights=False)
    ref.update_layer("b", 3, lora_alpha=6, config=cfg)
    with torch.no_grad():
        ref.lora_B["b"].weight.normal_(0, 0.5)
    ref.set_adapter(["a", "b"])
    fused = copy.deepcopy(ref)
    lnn.fuse_lora(fused)
    x = torch.randn(4, 24, requires_grad=True)
    gy = torch.randn(4, 18)
    want, got = run_grads(ref, x, gy), run_grads(fused, x, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert lnn.fused_counts() == {"2 adapters, DoRA": 1} and lnn.fallback_counts() == {}


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_autocast_matches_peft(p):
    """fp32 layer under bf16 autocast (training; with dropout, peft's mask): y (bf16) and every
    gradient against the float64 twin (no autocast) within 2x peft's error under autocast."""
    ref = _dora_layer(torch.float32, torch.float32, bias=True, dropout=p).train()
    fused = copy.deepcopy(ref)
    lnn.fuse_lora(fused)
    x = torch.randn(3, 7, 24).requires_grad_()
    gy = torch.randn(3, 7, 18).bfloat16()
    peft_mask, h1 = _record_dropout_mask(ref)
    ours_mask, h2 = _record_dropout_mask(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_peft = run_grads(ref, x, gy, seed=4)
        got = run_grads(fused, x, gy, seed=4)
    h1.remove(), h2.remove()
    oracle = copy.deepcopy(ref).double()
    if p > 0:
        assert torch.equal(ours_mask["mask"], peft_mask["mask"])
        oracle.lora_dropout["a"] = _FixedMask(peft_mask["mask"], p)
    want = run_grads(oracle, x.detach().double().requires_grad_(), gy.double())
    assert got[0].dtype == got_peft[0].dtype == torch.bfloat16
    assert lnn.fallback_counts() == {} and lnn.fused_counts() == FUSED
    assert_close_to_oracle(got, got_peft, want, torch.bfloat16)


def test_dora_after_another_adapter_is_left_to_peft():
    """A DoRA adapter after another active adapter (peft rescales the earlier adapters'
    output too) runs peft's forward, counted with the reason."""
    base_ref = _dora_layer(torch.float32, torch.float32, bias=True).eval()
    cfg = LoraConfig(r=3, lora_alpha=6, init_lora_weights=False)
    base_ref.update_layer("b", 3, lora_alpha=6, config=cfg)
    with torch.no_grad():
        base_ref.lora_B["b"].weight.normal_(0, 0.5)
    x = torch.randn(4, 24)
    ref = copy.deepcopy(base_ref)
    ref.set_adapter(["b", "a"])
    fused = copy.deepcopy(ref)
    lnn.fuse_lora(fused)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="DoRA adapter after the first active adapter"):
            y = fused(x)
        assert torch.equal(y, ref(x))
    assert lnn.fallback_counts() == {"DoRA adapter after the first active adapter": 1}
    assert lnn.fused_counts() == {}


def test_dora_weight_norm_cache_follows_the_weight():
    """||W_j||^2 is cached; an in-place write to W (version counter), a replaced W
    (storage), and clear_dora_cache() after a write through .data each give peft's output."""
    ref = _dora_layer(torch.float32, torch.float32, bias=True).eval()
    fused = copy.deepcopy(ref)
    lnn.fuse_lora(fused)
    x = torch.randn(4, 24)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)

    check()
    key = fused.__dict__["_dora_wsq_cache"][0]
    check()
    assert fused.__dict__["_dora_wsq_cache"][0] == key  # reused
    for layer in (ref, fused):
        with torch.no_grad():
            layer.get_base_layer().weight.mul_(1.5)
    check()
    for layer in (ref, fused):
        w = layer.get_base_layer().weight
        w.data = w.data * 0.5 + 0.1
    check()
    for layer in (ref, fused):
        layer.get_base_layer().weight.data.mul_(2.0)  # invisible to the version counter
    fused.clear_dora_cache()
    check()
    assert lnn.fallback_counts() == {}


def test_dora_merge_unmerge_like_peft():
    """merge/unmerge of a DoRA adapter are peft's; the fused forward after unmerge (norm
    cache cleared) gives peft's output again."""
    ref = _dora_layer(torch.float32, torch.float32, bias=True).eval()
    fused = copy.deepcopy(ref)
    lnn.fuse_lora(fused)
    x = torch.randn(4, 24)
    with torch.no_grad():
        y0 = fused(x)
        for layer in (ref, fused):
            layer.merge()
        torch.testing.assert_close(fused.get_base_layer().weight, ref.get_base_layer().weight, rtol=0, atol=0)
        torch.testing.assert_close(fused(x), y0, rtol=1e-5, atol=1e-5)
        for layer in (ref, fused):
            layer.unmerge()
        lnn.reset_fused_counts()
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused(x), y0, rtol=1e-5, atol=1e-5)
    assert lnn.fused_counts() == {"1 adapter, DoRA": 2}


# ---------------------------------------------------------------------------
# models: training and save/load

class MLP(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 6, bias=bias)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _perturb(model, seed=0):
    """Draw lora_B and move the magnitudes off their initial norms, so DoRA shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))


def _dora_model(fused: bool, bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = LoraConfig(target_modules=["lin0", "lin1"], use_dora=True, lora_dropout=dropout)
    model = get_peft_model(MLP(bias), lnn.use_fused_lora(cfg) if fused else cfg)
    _perturb(model, seed)
    return model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_dora_model_trains_like_peft(bias, dropout):
    plain, fused = _dora_model(False, bias, dropout), _dora_model(True, bias, dropout)
    assert sum(isinstance(m, lnn.LoraLinear) for m in fused.modules()) == 2
    x = torch.randn(8, 10)
    for model in (plain, fused):
        model.train()
        torch.manual_seed(3)
        model(x).square().mean().backward()
    n_grads = 0
    for (n1, p1), (n2, p2) in zip(plain.named_parameters(), fused.named_parameters()):
        assert n1 == n2 and p1.requires_grad == p2.requires_grad
        if p1.requires_grad:
            n_grads += 1
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6, msg=n1)
    assert n_grads == 6  # lora_A, lora_B, magnitude for lin0 and lin1
    assert lnn.fallback_counts() == {}
    assert lnn.fused_counts() == {"1 adapter, DoRA": 2}


@pytest.mark.parametrize("direction", ["fused_to_plain", "plain_to_fused"])
def test_dora_save_load(tmp_path, direction):
    """An adapter saved from the fused model loads into plain peft (and back) with the same
    keys (lora_magnitude_vector included) and outputs."""
    src_fused = direction == "fused_to_plain"
    src = _dora_model(src_fused).eval()
    src.save_pretrained(tmp_path)
    torch.manual_seed(0)  # the same base weights as _dora_model's
    cfg = LoraConfig.from_pretrained(tmp_path)
    assert cfg.use_dora
    if src_fused:
        dst = PeftModel.from_pretrained(MLP(), tmp_path)
    else:
        dst = PeftModel.from_pretrained(MLP(), tmp_path, config=lnn.use_fused_lora(cfg))
    dst.eval()
    assert sum(isinstance(m, lnn.LoraLinear) for m in dst.modules()) == (0 if src_fused else 2)
    assert set(dst.state_dict()) == set(src.state_dict())
    mags = [k for k in src.state_dict() if "lora_magnitude_vector" in k]
    assert len(mags) == 2
    for k in mags:
        assert torch.equal(dst.state_dict()[k], src.state_dict()[k])
    x = torch.randn(4, 10)
    with torch.no_grad():
        lnn.reset_fused_counts()
        y_src, y_dst = src(x), dst(x)
        torch.testing.assert_close(y_dst, y_src, rtol=1e-6, atol=1e-6)
        assert lnn.fused_counts() == {"1 adapter, DoRA": 2}  # lin0 and lin1 of the fused model
        fused_model = src if src_fused else dst
        with fused_model.disable_adapter():
            assert not torch.allclose(fused_model(x), y_src)  # the adapter contributes
    assert lnn.fallback_counts() == {"adapters disabled": 2}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_compile_fullgraph(dropout):
    """No graph break in the fused DoRA layer (aot_eager traces forward and backward; the
    norm cache is bypassed while tracing); eval output and gradients as eager."""
    layer = _dora_layer(torch.float32, torch.float32, bias=True, dropout=dropout).eval()
    lnn.fuse_lora(layer)
    x = torch.randn(3, 24, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in trainable(layer)]
    for p in trainable(layer):
        p.grad = None
    want = layer(x.detach())
    want.square().sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    for g, p in zip(grads, trainable(layer)):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    if dropout:  # training with dropout traces too
        layer.train()
        torch.compile(layer, backend="aot_eager", fullgraph=True)(x).sum().backward()
