"""The fused LoRA layer inside peft's own machinery: mixed models that stack a LoRA over
another tuner's layer, ``target_parameters``, what peft's status API reports, and the
widened fused path (``lora_bias``, several active adapters) against peft's own layer:
forward and every gradient (fp32, bf16), dropout, save/load both ways, no fallback."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as peft_layer  # noqa: E402

from llmopt_ext import nn as lnn  # noqa: E402

from lora_twins import assert_close_to_oracle, fused_peft_oracle, trainable  # noqa: E402



class MLP(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 6, bias=bias)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.fixture(autouse=True)
def _clean_counts():
    lnn.reset_fallback_counts()
    lnn.reset_fused_counts()
    yield


def _nonzero_B(model, seed=0):
    """peft initialises B = 0 (the adapter is a no-op); draw it so the adapter shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------------------
# cause 1: a LoRA stacked over a LoHa layer (peft's mixed models)

def _mixed(fused: bool):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoHaConfig(target_modules=["lin0"], init_weights=False), "loha", mixed=True)
    cfg = LoraConfig(target_modules=["lin0"], init_lora_weights=False)
    model.add_adapter("lora", lnn.use_fused_lora(cfg) if fused else cfg)
    model.set_adapter(["loha", "lora"])
    return model.eval()


def test_mixed_model_keeps_the_wrapped_adapter():
    plain, fused = _mixed(False), _mixed(True)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(5, 10)
    with torch.no_grad():
        want = plain(x)
        got = fused(x)
        lora_only = copy.deepcopy(plain)
        lora_only.set_adapter(["lora"])
        assert not torch.allclose(lora_only(x), want)  # the LoHa term is visible in the output
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    outer = fused.base_model.model.lin0
    assert type(outer) is peft_layer.Linear  # peft's layer: it calls the wrapped LoHa layer


def test_fused_layer_over_an_adapter_layer_calls_it():
    """fuse_lora leaves such a stack to peft; a LoraLinear forced over one falls back with
    the reason named and computes what peft does."""
    plain = _mixed(False)
    assert lnn.fuse_lora(plain) == 0
    layer = plain.base_model.model.lin0
    twin = copy.deepcopy(layer)
    layer.__class__ = lnn.LoraLinear
    x = torch.randn(4, 10)
    with pytest.warns(RuntimeWarning, match="base_layer is a Linear adapter layer"):
        y = layer(x)
    torch.testing.assert_close(y, twin(x), rtol=0, atol=0)
    assert lnn.fused_counts() == {}


# ---------------------------------------------------------------------------
# cause 2: target_parameters go to peft's ParamWrapper

def test_target_parameters_bias_raises_like_peft():
    cfg = LoraConfig(target_modules=[], target_parameters=["lin0.bias"])
    with pytest.raises(Exception) as plain_err:
        get_peft_model(MLP(), cfg)
    cfg = LoraConfig(target_modules=[], target_parameters=["lin0.bias"])
    assert "ParamWrapper" in str(plain_err.value)
    with pytest.raises(type(plain_err.value)) as fused_err:
        get_peft_model(MLP(), lnn.use_fused_lora(cfg))
    assert str(fused_err.value) == str(plain_err.value)


def test_target_parameters_builds_param_wrapper():
    def build(fused):
        torch.manual_seed(0)
        cfg = LoraConfig(target_modules=[], target_parameters=["lin0.weight"], init_lora_weights=False)
        return get_peft_model(MLP(), lnn.use_fused_lora(cfg) if fused else cfg)

    plain, fused = build(False), build(True)
    assert type(fused.base_model.model.lin0) is peft_layer.ParamWrapper
    assert not any(isinstance(m, lnn.LoraLinear) for m in fused.modules())
    x = torch.randn(3, 10)
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# cause 3: repr and peft's status API

def test_repr_and_layer_status_match_peft():
    torch.manual_seed(0)
    cfg = dict(target_modules=["lin0", "lin1"])
    plain = get_peft_model(MLP(), LoraConfig(**cfg))
    torch.manual_seed(0)
    fused = get_peft_model(MLP(), lnn.use_fused_lora(LoraConfig(**cfg)))
    assert isinstance(fused.base_model.model.lin0, lnn.LoraLinear)
    assert repr(fused.base_model.model.lin0) == repr(plain.base_model.model.lin0)
    assert repr(fused).startswith("PeftModel(") and "lora.Linear(" in repr(fused)
    status = {s.name: s.module_type for s in fused.get_layer_status()}
    assert status == {s.name: s.module_type for s in plain.get_layer_status()}
    assert set(status.values()) == {"lora.Linear"}
    assert fused.get_model_status() == plain.get_model_status()


# ---------------------------------------------------------------------------
# widened fused path: lora_bias and several active adapters

def _layer(dtype, adt, n_adapters, lora_bias, dropout, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(24, 18).to(dtype)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    names = [f"a{i}" for i in range(n_adapters)]
    layer = None
    for i, name in enumerate(names):
        r = 4 + 2 * i
        cfg = LoraConfig(r=r, lora_alpha=3 * r, lora_dropout=dropout, lora_bias=lora_bias, init_lora_weights=False)
        if layer is None:
            layer = peft_layer.Linear(base, name, config=cfg, r=r, lora_alpha=3 * r, lora_dropout=dropout,
                                      lora_bias=lora_bias)
        else:
            layer.update_layer(name, r, lora_alpha=3 * r, config=cfg)
        layer.lora_A[name].to(adt)
        layer.lora_B[name].to(adt)
    with torch.no_grad():
        for name in names:
            layer.lora_B[name].weight.normal_(0, 0.5)
            if lora_bias:
                layer.lora_B[name].bias.normal_(0, 0.5)
    layer.set_adapter(names)
    return layer


WIDE_CASES = [  # (x/W dtype, adapter dtype, active adapters, lora_bias)
    (torch.float32, torch.float32, 1, True),
    (torch.float32, torch.float32, 2, False),
    (torch.float32, torch.float32, 3, True),
    (torch.bfloat16, torch.float32, 2, True),
    (torch.bfloat16, torch.bfloat16, 2, True),
    (torch.bfloat16, torch.bfloat16, 1, True),
]


@pytest.mark.parametrize("case", WIDE_CASES, ids=lambda c: f"{str(c[0])[6:]}-{str(c[1])[6:]}-n{c[2]}-bias{int(c[3])}")
def test_widened_fused_path_matches_peft(case):
    """Eval mode: output and every gradient within 2x peft's own error against a float64
    twin (plus 4 ulps of the largest value for the different summation order)."""
    dtype, adt, n, lora_bias = case
    ref = _layer(dtype, adt, n, lora_bias, dropout=0.1).eval()
    got, got_peft, want, _ = fused_peft_oracle(ref, dtype, 24, 18)
    assert lnn.fallback_counts() == {}
    kind = f"{n} adapter{'s' if n > 1 else ''}" + (", lora_bias" if lora_bias else "")
    assert lnn.fused_counts() == {kind: 1}
    assert len(got) == 2 + (3 if lora_bias else 2) * n
    assert_close_to_oracle(got, got_peft, want, dtype)


def test_widened_fused_path_dropout_is_consistent():
    """Training with dropout: re-seeding reproduces the masks, so y is linear in x and in
    each B; the directional change of <gy, y> must equal <gradient, direction> exactly (up to
    fp32 rounding), i.e. backward used forward's masks for every adapter. Dropout is live
    on every adapter: each one's train output differs from eval."""
    layer = _layer(torch.float32, torch.float32, 2, True, dropout=0.4)
    lnn.fuse_lora(layer)
    layer.train()
    x = torch.randn(6, 24, requires_grad=True)
    gy = torch.randn(6, 18)

    def f(x_in):
        torch.manual_seed(7)
        return layer(x_in)

    y = f(x)
    params = trainable(layer)
    grads = torch.autograd.grad(y, [x] + params, gy)
    with torch.no_grad():
        for t, g in zip([x] + params, grads):
            if t is not x and "lora_A" in _name_of(layer, t):
                continue  # y is bilinear in (A, B): the exact-linearity check holds for x, B, bias
            v = torch.randn_like(t)
            t.add_(v)
            y2 = f(x)
            t.sub_(v)
            lhs = (gy * (y2 - y)).sum().item()
            rhs = (g * v).sum().item()
            assert abs(lhs - rhs) <= 1e-4 * (abs(rhs) + 1.0), (_name_of(layer, t), lhs, rhs)
        layer.eval()
        y_eval = layer(x)
        for name in ("a0", "a1"):
            layer.set_adapter([name])
            layer.train()
            torch.manual_seed(7)
            y_tr = layer(x)
            layer.eval()
            assert not torch.allclose(y_tr, layer(x)), name
        layer.set_adapter(["a0", "a1"])
        assert not torch.allclose(y, y_eval)
    assert lnn.fallback_counts() == {}


def _name_of(layer, t):
    return "x" if not isinstance(t, nn.Parameter) else next(n for n, p in layer.named_parameters() if p is t)


def _two_adapter_model(fused: bool, seed=0):
    torch.manual_seed(seed)
    cfg = dict(target_modules=["lin0", "lin1"], lora_bias=True, lora_dropout=0.0)
    model = get_peft_model(MLP(), LoraConfig(**cfg), "first")
    model.add_adapter("second", LoraConfig(r=4, **cfg))
    _nonzero_B(model, seed)
    if fused:
        assert lnn.fuse_lora(model) == 2
    model.base_model.set_adapter(["first", "second"])
    return model


def _load(path, fused: bool, seed=0):
    torch.manual_seed(seed)  # the same base weights as _two_adapter_model's
    model = PeftModel.from_pretrained(MLP(), path / "first", adapter_name="first")
    model.load_adapter(path / "second", adapter_name="second")
    if fused:
        assert lnn.fuse_lora(model) == 2
    model.base_model.set_adapter(["first", "second"])
    return model.eval()


# peft 0.21 warns that a 1-D lora_B.bias looks like an unsharded ZeRO-3 shard; it is saved whole
@pytest.mark.filterwarnings("ignore:Adapter .* LoRA tensor")
@pytest.mark.parametrize("direction", ["fused_to_plain", "plain_to_fused"])
def test_two_adapters_with_lora_bias_save_load(tmp_path, direction):
    src_fused = direction == "fused_to_plain"
    src = _two_adapter_model(src_fused).eval()
    src.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["first", "second"]
    dst = _load(tmp_path, not src_fused)
    x = torch.randn(4, 10)
    fused_model = src if src_fused else dst
    with torch.no_grad():
        lnn.reset_fused_counts()
        y_fused = fused_model(x)
        assert lnn.fused_counts() == {"2 adapters, lora_bias": 2}  # lin0 and lin1, one forward
        torch.testing.assert_close(dst(x), src(x), rtol=1e-6, atol=1e-6)
        single = copy.deepcopy(src)
        single.base_model.set_adapter(["first"])
        assert not torch.allclose(single(x), y_fused)  # the second adapter contributes
    assert lnn.fallback_counts() == {}


def test_two_adapters_train_like_peft():
    plain, fused = _two_adapter_model(False), _two_adapter_model(True)
    x = torch.randn(8, 10)
    for model in (plain, fused):
        loss = model(x).square().mean()
        loss.backward()
    for (n1, p1), (n2, p2) in zip(plain.named_parameters(), fused.named_parameters()):
        assert n1 == n2 and p1.requires_grad == p2.requires_grad
        if p1.requires_grad:
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6, msg=n1)
    assert sum("second" in n and p.requires_grad for n, p in fused.named_parameters()) == 6
    assert lnn.fallback_counts() == {}
