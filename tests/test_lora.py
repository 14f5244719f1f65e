"""Fused LoRA Linear and LoRA merge/unmerge: every backend against the float64 reference
and against peft's own lora.Linear (the real client), bad input, opcheck, dropout mask
consistency, peft integration (use_fused_lora / fuse_lora, save/load both ways) and a
tiny LlamaForCausalLM trained side by side with peft."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on CPU (small shapes)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmopt_ext import backend, ops  # noqa: E402
from llmopt_ext.ops import reference  # noqa: E402

from conftest import HAS_CUDA, backend_params, kernels_loaded  # noqa: E402

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as peft_layer  # noqa: E402

from llmopt_ext import nn as lnn  # noqa: E402


def _triton_ok() -> bool:
    return backend.unavailable_reason("triton") is None


triton_mark = pytest.mark.skipif(not _triton_ok(), reason="triton not importable / no device to run it")
DEV = "cuda" if HAS_CUDA else "cpu"
LINEAR_BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("triton", id="triton", marks=triton_mark)]
MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ulp of each value of x (float64) in `dtype` (subnormal range: the smallest ulp)."""
    _, e = torch.frexp(x.double())
    min_e = {torch.float32: -125, torch.bfloat16: -125, torch.float16: -13}[dtype]
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), torch.clamp(e, min=min_e) - 1 - MANT[dtype])


# ---------------------------------------------------------------------------
# merge / unmerge

MERGE_CASES = [  # (out, in, r, weight dtype, adapter dtype, fan_in_fan_out)
    (7, 5, 1, torch.float32, torch.float32, False),
    (123, 77, 8, torch.bfloat16, torch.float32, False),
    (123, 77, 8, torch.bfloat16, torch.bfloat16, True),
    (33, 4100, 16, torch.float16, torch.float32, False),  # > one 2048-column tile, threaded
    (300, 257, 64, torch.bfloat16, torch.float32, True),
    (64, 48, 4, torch.float16, torch.float16, False),
]


def _merge_inputs(out_f, in_f, r, wdt, adt, fi, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((in_f, out_f) if fi else (out_f, in_f), generator=g).to(wdt)
    a = (torch.randn(r, in_f, generator=g) / r**0.5).to(adt)
    b = (torch.randn(out_f, r, generator=g) * 0.1).to(adt)
    return w, a, b


@pytest.mark.parametrize("b,device", backend_params("lora_merge_"))
@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: f"{c[0]}x{c[1]}r{c[2]}-{str(c[3])[6:]}-{str(c[4])[6:]}-fi{int(c[5])}")
def test_merge_matches_reference_bits(b, device, case):
    out_f, in_f, r, wdt, adt, fi = case
    w, a, bb = (t.to(device) for t in _merge_inputs(*case))
    want = w.clone()
    reference.lora_merge_(want, a, bb, torch.tensor(0.75), fi)
    got = w.clone()
    with backend.use(b):
        ops.lora_merge_(got, a, bb, 0.75, fi)
    assert torch.equal(got.cpu(), want.cpu())
    with backend.use(b):
        ops.lora_unmerge_(got, a, bb, torch.tensor(0.75), fi)
    reference.lora_unmerge_(want, a, bb, torch.tensor(0.75), fi)
    assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.parametrize("case", MERGE_CASES[1:], ids=lambda c: f"{c[0]}x{c[1]}r{c[2]}-{str(c[3])[6:]}")
def test_merge_error_bounds(case):
    """merge = correctly rounded W + D up to D's float32 accumulation error; unmerge(merge(W))
    within 1 ulp of W plus half an ulp of the merged value; peft's merge rounds twice."""
    out_f, in_f, r, wdt, adt, fi = case
    w, a, b = _merge_inputs(*case)
    s = 0.75
    delta = (b.double() @ a.double()) * s
    delta = delta.t() if fi else delta
    exact = w.double() + delta
    acc_err = r * 2.0**-23 * s * (b.double().abs() @ a.double().abs())  # float32 accumulation
    acc_err = acc_err.t() if fi else acc_err
    merged = w.clone()
    ops.lora_merge_(merged, a, b, s, fi)
    assert torch.all((merged.double() - exact).abs() <= 0.5 * ulp(merged, wdt) + acc_err)
    restored = merged.clone()
    ops.lora_unmerge_(restored, a, b, s, fi)
    assert torch.all((restored.double() - w.double()).abs() <= ulp(w, wdt) + 0.5 * ulp(merged, wdt))
    if wdt != torch.float32:  # peft's delta.to(W dtype) then W + delta: a second rounding
        peft_merged = (w + delta.to(wdt)).double()
        assert (merged.double() - exact).abs().sum() <= (peft_merged - exact).abs().sum()


@pytest.mark.parametrize("b", ["cpu", "reference"])
def test_merge_noncontiguous_weight(b):
    w, a, bb = _merge_inputs(40, 24, 4, torch.bfloat16, torch.float32, False)
    wt = w.t().contiguous().t()  # (40, 24) with column stride 40
    want = w.clone()
    reference.lora_merge_(want, a, bb, 0.5)
    with backend.use(b):
        ops.lora_merge_(wt, a, bb, 0.5)
    assert torch.equal(wt, want)


def _merge_bad_inputs():
    w, a, b = _merge_inputs(12, 10, 4, torch.float32, torch.float32, False)
    return [
        ("rank mismatch", (w, a, b[:, :3], 1.0, False), "rank mismatch"),
        ("weight shape", (w[:11], a, b, 1.0, False), "weight has shape"),
        ("fan_in_fan_out shape", (w, a, b, 1.0, True), "fan_in_fan_out"),
        ("weight dtype", (w.double(), a, b, 1.0, False), "weight has dtype"),
        ("A/B dtypes", (w, a, b.half(), 1.0, False), "lora_B has dtype"),
        ("device", (w, a.to("meta"), b, 1.0, False), "lora_A is on meta"),
        ("expanded weight", (torch.zeros(10).expand(12, 10), a, b, 1.0, False), "overlapping"),
        ("scaling", (w, a, b, "x", False), "scaling"),
    ]


@pytest.mark.parametrize("name,args,match", _merge_bad_inputs(), ids=[c[0] for c in _merge_bad_inputs()])
@pytest.mark.parametrize("b", ["cpu", "reference"])
def test_merge_bad_input(name, args, match, b):
    before = args[0].clone()
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        with backend.use(b):
            ops.lora_merge_(*args)
    assert torch.equal(args[0], before)


@pytest.mark.skipif(not kernels_loaded(), reason="needs _C")
def test_merge_cpp_checks_directly():
    """The C++ glue checks too (a caller of torch.ops.llmopt_ext.* skips the Python checks)."""
    w, a, b = _merge_inputs(12, 10, 4, torch.bfloat16, torch.float32, False)
    before = w.clone()
    with pytest.raises(ValueError, match="rank mismatch"):
        torch.ops.llmopt_ext.lora_merge_(w, a, b[:, :3], torch.tensor(1.0), False)
    with pytest.raises(ValueError, match="weight has shape"):
        torch.ops.llmopt_ext.lora_unmerge_(w, a, b, torch.tensor(1.0), True)
    with pytest.raises(TypeError, match="lora_A has dtype"):
        torch.ops.llmopt_ext.lora_merge_(w, a.double(), b.double(), torch.tensor(1.0), False)
    assert torch.equal(w, before)


@pytest.mark.skipif(not kernels_loaded(), reason="needs _C")
@pytest.mark.parametrize("fi", [False, True])
def test_merge_opcheck(fi):
    w, a, b = _merge_inputs(9, 13, 3, torch.bfloat16, torch.float32, fi)
    for op in (torch.ops.llmopt_ext.lora_merge_.default, torch.ops.llmopt_ext.lora_unmerge_.default):
        torch.library.opcheck(op, (w.clone(), a, b, torch.tensor(0.5), fi))


# ---------------------------------------------------------------------------
# lora_linear against peft's lora.Linear

# (in, out, r, dtype, adapter dtype, bias mode, rslora, fan_in_fan_out, x layout, scaling kind)
PEFT_CASES = [
    (37, 29, 8, torch.float32, torch.float32, "train", False, False, "3d", "float"),
    (37, 29, 1, torch.float32, torch.float32, "none", True, False, "2d", "tensor"),
    (33, 17, 64, torch.float32, torch.float32, "frozen", False, True, "3d", "float"),
    (33, 17, 16, torch.float32, torch.float32, "train", False, False, "noncontig", "float"),
    (37, 29, 8, torch.bfloat16, torch.float32, "frozen", False, False, "3d", "float"),
    (37, 29, 8, torch.bfloat16, torch.bfloat16, "train", True, True, "3d", "tensor"),
    (37, 29, 8, torch.bfloat16, torch.bfloat16, "none", False, False, "noncontig", "float"),
    (24, 40, 8, torch.float16, torch.float32, "none", False, False, "3d", "float"),
]


def _case_id(c):
    return f"{c[0]}-{c[1]}-r{c[2]}-{str(c[3])[6:]}-{str(c[4])[6:]}-bias_{c[5]}-rs{int(c[6])}-fi{int(c[7])}-{c[8]}-{c[9]}"


def _peft_layer(in_f, out_f, r, dtype, adt, bias_mode, rslora, fi, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    if fi:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(out_f, in_f)
        torch.nn.init.normal_(base.weight, std=in_f**-0.5)
        torch.nn.init.normal_(base.bias, std=0.1)
        if bias_mode == "none":
            base.bias = None
    else:
        base = torch.nn.Linear(in_f, out_f, bias=bias_mode != "none")
    base = base.to(dtype)
    base.weight.requires_grad_(False)
    if base.bias is not None:
        base.bias.requires_grad_(bias_mode == "train")
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, use_rslora=rslora, fan_in_fan_out=fi,
                     init_lora_weights=False)
    layer = peft_layer.Linear(base, "default", config=cfg, r=r, lora_alpha=2 * r, is_target_conv_1d_layer=fi)
    layer.lora_A["default"].to(adt)
    layer.lora_B["default"].to(adt)
    with torch.no_grad():  # peft's init_lora_weights=False draws B ~ U; make it O(1)-scaled
        layer.lora_B["default"].weight.normal_(0, 0.5)
    return layer


def _x(in_f, dtype, layout, seed=1):
    g = torch.Generator().manual_seed(seed)
    if layout == "3d":
        x = torch.randn(2, 5, in_f, generator=g)
    elif layout == "2d":
        x = torch.randn(7, in_f, generator=g)
    else:  # non-contiguous: a transposed view
        x = torch.randn(3, in_f, 6, generator=g).transpose(1, 2)
    return x.to(dtype).requires_grad_()


def _run(layer, x, gy):
    y = layer(x)
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    bias = layer.get_base_layer().bias
    if bias is not None and bias.requires_grad:
        params.append(bias)
    return [y] + list(torch.autograd.grad(y, params, gy))


@pytest.mark.parametrize("b", LINEAR_BACKENDS)
@pytest.mark.parametrize("case", PEFT_CASES, ids=_case_id)
def test_fused_layer_matches_peft(b, case):
    """Eval mode (dropout inactive). Error against a float64 oracle at most ~2x peft's own
    (flash-attention's rule), plus a few ulps for the different GEMM blocking."""
    in_f, out_f, r, dtype, adt, bias_mode, rslora, fi, layout, skind = case
    ref_layer = _peft_layer(in_f, out_f, r, dtype, adt, bias_mode, rslora, fi).eval()
    if skind == "tensor":
        ref_layer.scaling["default"] = torch.tensor(ref_layer.scaling["default"] * 0.5)
    fused = copy.deepcopy(ref_layer)
    assert lnn.fuse_lora(fused) == 1 and isinstance(fused, lnn.LoraLinear)
    oracle = copy.deepcopy(ref_layer).double()
    oracle.scaling = dict(ref_layer.scaling)
    x = _x(in_f, dtype, layout)
    g = torch.Generator().manual_seed(2)
    shape = (*x.shape[:-1], out_f)
    gy = torch.randn(shape, generator=g).to(dtype)
    want = _run(oracle, x.detach().double().requires_grad_(), gy.double())
    got_peft = _run(ref_layer, x, gy)
    lnn.reset_fallback_counts()
    with backend.use(b):
        got = _run(fused, x, gy)
    assert lnn.fallback_counts() == {}
    names = ["y", "dx", "dA", "dB", "dbias"]
    for name, g_ours, g_peft, w in zip(names, got, got_peft, want):
        assert g_ours.dtype == g_peft.dtype and g_ours.shape == g_peft.shape, name
        err = (g_ours.double() - w).abs().max().item()
        err_peft = (g_peft.double() - w).abs().max().item()
        slack = 4 * 2.0 ** -MANT[g_ours.dtype] * w.abs().max().item()
        assert err <= 2 * err_peft + slack, f"{name}: ours {err:.3g} peft {err_peft:.3g}"


@pytest.mark.parametrize("b", LINEAR_BACKENDS + [pytest.param("reference", id="reference")])
def test_dropout_mask_statistics_and_consistency(b):
    """A = B = I, W = 0, s = 1: y = x * mask / (1 - p) exposes the mask; backward must use
    the same mask (dx = dy * mask / (1 - p), dA = dy^T (x * mask / (1 - p)))."""
    n, p = 32, 0.25
    x = (torch.rand(48, n) + 0.5).requires_grad_()  # nonzero everywhere
    eye = torch.eye(n)
    a, bb = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    w = torch.zeros(n, n)
    torch.manual_seed(0)
    with backend.use(b):
        y = ops.lora_linear(x, w, None, a, bb, 1.0, dropout_p=p, training=True)
        y2 = ops.lora_linear(x, w, None, a, bb, 1.0, dropout_p=p, training=True)
        y_eval = ops.lora_linear(x, w, None, a, bb, 1.0, dropout_p=p, training=False)
    torch.testing.assert_close(y_eval, x)
    mask = y != 0
    keep = mask.double().mean().item()
    sigma = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(keep - (1 - p)) < 5 * sigma, keep
    assert not torch.equal(mask, y2 != 0), "two calls drew the same mask"
    torch.testing.assert_close(y, x * mask / (1 - p))
    gy = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, (x, a, bb), gy)
    xd = x.detach() * mask / (1 - p)
    torch.testing.assert_close(dx, gy * mask / (1 - p))
    torch.testing.assert_close(da, gy.t() @ xd)
    torch.testing.assert_close(db, gy.t() @ xd)
    torch.manual_seed(0)
    with backend.use(b):
        y3 = ops.lora_linear(x, w, None, a, bb, 1.0, dropout_p=p, training=True)
    assert torch.equal(y3 != 0, mask), "torch.manual_seed must reproduce the mask"


def _linear_bad_inputs():
    x, w, a, b = torch.randn(3, 10), torch.randn(12, 10), torch.randn(4, 10), torch.randn(12, 4)
    return [
        ("x last dim", (torch.randn(3, 9), w, None, a, b, 1.0), "x's last dimension"),
        ("rank mismatch", (x, w, None, a, b[:, :3], 1.0), "rank mismatch"),
        ("device", (x, w, None, a, b.to("meta"), 1.0), "lora_B is on meta"),
        ("x dtype", (x.double(), w, None, a, b, 1.0), "x has dtype"),
        ("adapter dtype", (x.bfloat16(), w.bfloat16(), None, a.half(), b.half(), 1.0), "lora_A has dtype"),
        ("bias shape", (x, w, torch.zeros(11), a, b, 1.0), "bias has shape"),
        ("dropout", (x, w, None, a, b, 1.0, 1.0), "dropout_p"),
    ]


@pytest.mark.parametrize("name,args,match", _linear_bad_inputs(), ids=[c[0] for c in _linear_bad_inputs()])
@pytest.mark.parametrize("b", ["cpu", "reference"])
def test_linear_bad_input(name, args, match, b):
    with pytest.raises((ValueError, TypeError), match=match):
        with backend.use(b):
            ops.lora_linear(*args)


@triton_mark
def test_triton_opcheck():
    from llmopt_ext.ops.triton import lora as tl_lora

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 24, generator=g, device="cpu").to(DEV)
    w, a, b = (torch.randn(s, generator=g).to(DEV) for s in ((18, 24), (4, 24), (18, 4)))
    bias = torch.randn(18, generator=g).to(DEV)
    args = (x, w, bias, a.requires_grad_(), b.requires_grad_(), None, 0.5, None, 0.0, False)
    torch.library.opcheck(tl_lora.lora_linear_triton_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compile_fullgraph_layer():
    """No graph breaks inside the fused layer (aot_eager: traces forward and backward)."""
    layer = _peft_layer(16, 12, 4, torch.float32, torch.float32, "train", False, False, dropout=0.0)
    lnn.fuse_lora(layer)
    x = torch.randn(3, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    want = layer(x.detach())
    torch.testing.assert_close(y, want)
    assert layer.lora_A["default"].weight.grad is not None


# ---------------------------------------------------------------------------
# peft integration

def test_fallbacks_are_counted_and_reported():
    layer = _peft_layer(16, 12, 4, torch.float32, torch.float32, "none", False, False, dropout=0.0)
    layer.update_layer("other", 4, lora_alpha=8, config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    peft_twin = copy.deepcopy(layer)
    lnn.fuse_lora(layer)
    x = torch.randn(4, 16)
    lnn.reset_fallback_counts()
    layer.enable_adapters(False)
    peft_twin.enable_adapters(False)
    with pytest.warns(RuntimeWarning, match="adapters disabled"):
        y = layer(x)
    torch.testing.assert_close(y, peft_twin(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: the second call only counts
        layer(x)
    assert lnn.fallback_counts() == {"adapters disabled": 2}
    layer.enable_adapters(True)
    peft_twin.enable_adapters(True)
    layer.merge()
    with pytest.warns(RuntimeWarning, match="merged"):
        layer(x)
    layer.unmerge()
    with pytest.warns(RuntimeWarning, match="mixed adapter_names"):
        layer(x, adapter_names=["default", "other", "__base__", "default"])
    assert sum(lnn.fallback_counts().values()) == 4


@pytest.mark.parametrize("safe", [False, True])
def test_layer_merge_unmerge(safe):
    layer = _peft_layer(40, 24, 8, torch.bfloat16, torch.float32, "frozen", False, False, dropout=0.0)
    lnn.fuse_lora(layer)
    w0 = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(6, 40).bfloat16()
    y_unmerged = layer(x)
    layer.merge(safe_merge=safe)
    assert layer.merged
    wm = layer.get_base_layer().weight.detach().clone()
    lnn.reset_fallback_counts()
    with pytest.warns(RuntimeWarning):
        y_merged = layer(x)
    torch.testing.assert_close(y_merged, y_unmerged, atol=0.05, rtol=0.02)
    layer.unmerge()
    w1 = layer.get_base_layer().weight
    assert torch.all((w1.double() - w0.double()).abs() <= ulp(w0, torch.bfloat16) + 0.5 * ulp(wm, torch.bfloat16))


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _lora_cfg():
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)


def _train(model, steps=4):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    losses = []
    ids = torch.randint(0, 96, (2, 12), generator=g)  # one batch: the loss must go down
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_tiny_llama_trains_like_peft_and_interoperates(tmp_path):
    torch.manual_seed(5)
    plain = get_peft_model(_tiny_llama(), _lora_cfg())
    torch.manual_seed(5)
    fused = get_peft_model(_tiny_llama(), lnn.use_fused_lora(_lora_cfg()))
    n_fused = sum(isinstance(m, lnn.LoraLinear) for m in fused.modules())
    assert n_fused == 6
    for (k1, v1), (k2, v2) in zip(plain.state_dict().items(), fused.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    lnn.reset_fallback_counts()
    l_plain, l_fused = _train(plain), _train(fused)
    assert lnn.fallback_counts() == {}
    for a, b in zip(l_plain, l_fused):
        assert abs(a - b) <= 1e-4 * abs(a), (l_plain, l_fused)
    assert l_fused[-1] < l_fused[0]

    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(9))
    # fused -> plain peft: same keys, same tensors, same outputs
    fused.save_pretrained(tmp_path / "fused")
    loaded_plain = PeftModel.from_pretrained(_tiny_llama(), tmp_path / "fused")
    assert not any(isinstance(m, lnn.LoraLinear) for m in loaded_plain.modules())
    fused.eval(), loaded_plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_plain(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-5)
    # plain -> fused (config with the mapping), and fuse_lora on a loaded model
    plain.save_pretrained(tmp_path / "plain")
    cfg = lnn.use_fused_lora(LoraConfig.from_pretrained(tmp_path / "plain"))
    loaded_fused = PeftModel.from_pretrained(_tiny_llama(), tmp_path / "plain", config=cfg).eval()
    assert sum(isinstance(m, lnn.LoraLinear) for m in loaded_fused.modules()) == 6
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    again = PeftModel.from_pretrained(_tiny_llama(), tmp_path / "plain").eval()
    assert lnn.fuse_lora(again) == 6
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_factory_skips_linear_subclasses():
    """bitsandbytes' quantized Linear subclass nn.Linear: the factory must leave them to peft."""

    class QuantLinear(torch.nn.Linear):
        pass

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.q = QuantLinear(8, 8)

    model = get_peft_model(M(), lnn.use_fused_lora(LoraConfig(r=2, target_modules=["a", "q"])))
    assert type(model.base_model.model.a) is lnn.LoraLinear
    assert type(model.base_model.model.q) is peft_layer.Linear


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_lora_linear_under_autocast(device):
    """Under torch.autocast the forward GEMMs run in bf16 and dy arrives in bf16: backward must
    run under the same autocast state (it used to fail in dy @ W with 'BFloat16 != float').
    Error against the fp32 computation at most 2x that of plain PyTorch under autocast."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 40, device=device, requires_grad=True)
    w = torch.randn(24, 40, device=device)
    b = torch.randn(24, device=device, requires_grad=True)
    a = (torch.randn(8, 40, device=device) * 0.1).requires_grad_()
    bb = (torch.randn(24, 8, device=device) * 0.1).requires_grad_()
    leaves = (x, b, a, bb)

    def grads(fn, autocast):
        for t in leaves:
            t.grad = None
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            y = fn()
        y.float().square().sum().backward()
        return [y.detach().float()] + [t.grad.clone() for t in leaves]

    ours = lambda: ops.lora_linear(x, w, b, a, bb, 2.0)  # noqa: E731
    plain = lambda: (torch.nn.functional.linear(x, w, b)  # noqa: E731
                     + 2.0 * torch.nn.functional.linear(torch.nn.functional.linear(x, a), bb))
    exact = grads(plain, False)
    got, base = grads(ours, True), grads(plain, True)
    for g, p, e in zip(got, base, exact):
        assert g.dtype == e.dtype or g.dtype == torch.bfloat16
        err, err_plain = (g.float() - e).norm(), (p.float() - e).norm()
        assert err <= 2 * err_plain + 1e-6 * e.norm(), (err, err_plain)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_fused_layer_under_autocast(device, amp):
    """fp32 model under autocast: x reaches a LoRA layer in fp32 (after a norm) or already in
    the autocast dtype (after another autocast op). The fused layer takes both without falling
    back to peft, returns autocast's dtype, and its error against the fp32 computation on the
    same x values is at most twice that of peft under the same autocast (fp32 adapters: it
    rounds them less)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40, device=device)
    base.weight.requires_grad_(False)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    plain = peft_layer.Linear(base, "default", config=cfg, r=4, lora_alpha=8)
    fused = copy.deepcopy(plain)
    lnn.fuse_lora(fused)
    assert type(fused) is lnn.LoraLinear
    x0 = torch.randn(2, 5, 48, device=device)
    for x_dtype in (torch.float32, amp):
        x_vals = x0.to(x_dtype)

        def run(layer, autocast, x_in):
            x = x_in.detach().clone().requires_grad_()
            layer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=amp, enabled=autocast):
                y = layer(x)
            y.float().square().sum().backward()
            return [y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]

        lnn.reset_fallback_counts()
        exact = [t.float() for t in run(plain, False, x_vals.float())]
        got, ref = run(fused, True, x_vals), run(plain, True, x_vals)
        assert lnn.fallback_counts() == {}, lnn.fallback_counts()
        assert got[0].dtype == ref[0].dtype == amp and got[1].dtype == x_dtype
        assert len(got) == len(ref) == 5  # y, dx, d lora_A, d lora_B, d bias
        for g, r, e in zip(got, ref, exact):
            err, err_peft = (g.float() - e).norm(), (r.float() - e).norm()
            assert err <= 2 * err_peft + 1e-6 * e.norm(), (x_dtype, err, err_peft)
