"""Fused optimizer update ops (sophia_update_, adahessian_update_): every backend against
the pure-PyTorch reference, the reference against float64 math written from the papers,
AMP skip/scale, bad input, opcheck."""
from __future__ import annotations

import pytest
import torch

from llmopt_ext import backend, ops
from llmopt_ext.ops import reference

from conftest import DTYPES, ULP, backend_params

# odd, tiny, empty, and larger than one CPU (16384) / CUDA (8192) chunk
SHAPES = [(1,), (7,), (123,), (0,), (3, 5, 7), (4097, 5)]


def make_case(dtype, device, shapes=SHAPES, seed=0, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)

    def r(s, scale=1.0):
        return torch.randn(s, generator=gen) * scale

    def param_like(s):
        if layout == "strided" and len(s) >= 1 and s[-1] > 0:
            return r((*s[:-1], 2 * s[-1])).to(dtype).to(device)[..., ::2]
        return r(s).to(dtype).to(device)

    return dict(
        params=[param_like(s) for s in shapes],
        grads=[r(s).to(dtype).to(device) for s in shapes],
        exp_avgs=[r(s, 0.5).to(device) for s in shapes],
        v=[r(s).abs().to(device) for s in shapes],
        hessians=[r(s, 0.1).abs().to(device) for s in shapes],
        hut=[r(s, 0.3).to(device) for s in shapes],  # signed Hutchinson estimate
    )


def clone(ts):
    """Copies that keep a non-contiguous (every-other-element) layout."""
    out = []
    for t in ts:
        if t.is_contiguous():
            out.append(t.clone())
        else:
            buf = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)[..., ::2]
            out.append(buf.copy_(t))
    return out


def run(b, fn, *args, **kw):
    with backend.use(b):
        return fn(*args, **kw)


def assert_same(got, want, dtype=None, ulps=0):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        if ulps == 0:
            assert torch.equal(g.cpu(), w.cpu()), f"tensor {i}: max diff {(g.double() - w.double()).abs().max()}"
        else:
            tol = ulps * ULP[g.dtype] * w.double().abs().cpu().clamp(min=1.0)
            assert torch.all((g.double().cpu() - w.double().cpu()).abs() <= tol), i


SOPHIA_KW = dict(lr=0.05, beta1=0.9, rho=0.5, weight_decay=0.1, eps=1e-12)


def sophia_run(b, case, clip, **extra):
    p, m = clone(case["params"]), clone(case["exp_avgs"])
    run(b, ops.sophia_update_, p, case["grads"], m, case["hessians"], clip=clip, **{**SOPHIA_KW, **extra})
    return p, m


def adahessian_run(b, case, k=1.0, step=3, **extra):
    p, m, v = clone(case["params"]), clone(case["exp_avgs"]), clone(case["v"])
    run(b, ops.adahessian_update_, p, case["grads"], m, v, case["hut"], step=step, lr=0.1, beta1=0.9,
        beta2=0.999, weight_decay=0.01, eps=1e-4, hessian_power=k, **extra)
    return p, m, v


# ---------------------------------------------------------------------------
# the reference against float64 math written from the papers

@pytest.mark.parametrize("clip", [False, True])
def test_sophia_reference_matches_paper_math(clip):
    case = make_case(torch.float32, "cpu")
    p, m = sophia_run("reference", case, clip)
    kw = SOPHIA_KW
    for i in range(len(SHAPES)):
        g, m0, h, p0 = (case[k][i].double() for k in ("grads", "exp_avgs", "hessians", "params"))
        m1 = kw["beta1"] * m0 + (1 - kw["beta1"]) * g
        if clip:
            u = torch.clamp(m1 / torch.clamp(h, min=kw["eps"]), -kw["rho"], kw["rho"])
        else:
            u = torch.sign(m1) * torch.clamp(m1.abs() / (kw["rho"] * h + kw["eps"]), max=1)
        p1 = p0 * (1 - kw["lr"] * kw["weight_decay"]) - kw["lr"] * u
        assert torch.allclose(m[i].double(), m1, rtol=1e-6, atol=1e-7)
        assert torch.allclose(p[i].double(), p1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1.0, 0.5])
def test_adahessian_reference_matches_paper_math(k):
    case = make_case(torch.float32, "cpu")
    p, m, v = adahessian_run("reference", case, k=k, step=3)
    for i in range(len(SHAPES)):
        g, m0, v0, d, p0 = (case[n][i].double() for n in ("grads", "exp_avgs", "v", "hut", "params"))
        m1 = 0.9 * m0 + 0.1 * g
        v1 = 0.999 * v0 + 0.001 * d * d
        den = (v1 / (1 - 0.999**3)) ** (k / 2) + 1e-4
        p1 = p0 - 0.1 * (m1 / (1 - 0.9**3) / den + 0.01 * p0)
        assert torch.allclose(m[i].double(), m1, rtol=1e-6, atol=1e-7)
        assert torch.allclose(v[i].double(), v1, rtol=1e-6, atol=1e-7)
        assert torch.allclose(p[i].double(), p1, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# every backend against the reference

@pytest.mark.parametrize("b,device", backend_params("sophia_update_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_sophia_matches_reference(b, device, dtype, clip, layout):
    case = make_case(dtype, device, layout=layout)
    got = sophia_run(b, case, clip)
    want = sophia_run("reference", case, clip)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])
    if layout == "strided":  # written through the caller's non-contiguous views
        assert any(not t.is_contiguous() for t in got[0])


@pytest.mark.parametrize("b,device", backend_params("adahessian_update_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1.0, 0.5])
def test_adahessian_matches_reference(b, device, dtype, k):
    case = make_case(dtype, device)
    got = adahessian_run(b, case, k=k)
    want = adahessian_run("reference", case, k=k)
    # sqrt path: same bits; powf (k != 1) may differ by an ulp between libm and torch
    ulps = 0 if k == 1.0 else 2
    assert_same(got[1], want[1])
    assert_same(got[2], want[2])
    if ulps == 0:
        assert_same(got[0], want[0])
    else:
        assert_same(got[0], want[0], ulps=ulps if dtype == torch.float32 else 1)


@pytest.mark.parametrize("b,device", backend_params("sophia_update_"))
def test_lists_longer_than_one_launch(b, device):
    shapes = [((i * 37) % 101 + 1,) for i in range(599)] + [(20000,)]  # > 512 tensors per CUDA launch
    case = make_case(torch.bfloat16, device, shapes=shapes, seed=3)
    for clip in (False, True):
        got, want = sophia_run(b, case, clip), sophia_run("reference", case, clip)
        assert_same(got[0], want[0])
        assert_same(got[1], want[1])
    got, want = adahessian_run(b, case), adahessian_run("reference", case)
    for g, w in zip(got, want):
        assert_same(g, w)


@pytest.mark.parametrize("b,device", backend_params("sophia_update_"))
def test_sophia_moves_no_element_more_than_lr(b, device):
    case = make_case(torch.float32, device, shapes=[(5000,)], seed=5)
    case["grads"] = [g * 1e3 for g in case["grads"]]  # huge gradients, tiny curvature
    case["hessians"] = [h * 1e-6 for h in case["hessians"]]
    p, _ = sophia_run(b, case, clip=False, weight_decay=0.0)
    p0 = case["params"][0].double()
    moved = (p[0].double() - p0).abs()
    # lr, plus the float32 rounding of p - lr (half an ulp of p)
    assert torch.all(moved <= SOPHIA_KW["lr"] * (1 + 1e-6) + ULP[torch.float32] * p0.abs())
    step = moved.max().item()
    assert step >= 0.99 * SOPHIA_KW["lr"]  # the clip is reached: the bound is tight


@pytest.mark.parametrize("b,device", backend_params("sophia_update_"))
@pytest.mark.parametrize("scale_kind", ["cpu", "device"])
def test_grad_scale_and_found_inf(b, device, scale_kind):
    case = make_case(torch.float16, device, shapes=[(7,), (4097,)])
    where = "cpu" if scale_kind == "cpu" else device
    scale = torch.tensor([1024.0], device=where)
    unscaled = dict(case, grads=[g.clone() for g in case["grads"]])
    case["grads"] = [(g.float() * 1024).to(torch.float16) for g in case["grads"]]  # exact (power of two)
    assert_same(sophia_run(b, case, False, grad_scale=scale)[0], sophia_run("reference", unscaled, False)[0])
    got = adahessian_run(b, dict(case, hut=[h * 1024 for h in case["hut"]]), grad_scale=scale)
    want = adahessian_run("reference", unscaled)
    for g, w in zip(got, want):
        assert_same(g, w)
    # found_inf set: nothing is written
    inf = torch.tensor([1.0], device=where)
    case["grads"][0][0] = float("inf")
    p, m = sophia_run(b, case, False, grad_scale=scale, found_inf=inf)
    assert_same(p, case["params"])
    assert_same(m, case["exp_avgs"])
    got = adahessian_run(b, case, grad_scale=scale, found_inf=inf)
    for g, w in zip(got, (case["params"], case["exp_avgs"], case["v"])):
        assert_same(g, w)
    # found_inf == 0: the step happens
    p, _ = sophia_run(b, case, False, found_inf=torch.zeros(1, device=where))
    assert not torch.equal(p[1], case["params"][1])


@pytest.mark.parametrize("b,device", backend_params("adahessian_update_"))
def test_adahessian_step_as_device_tensor(b, device):
    case = make_case(torch.float32, device)
    got = adahessian_run(b, case, step=torch.tensor(5.0, device=device))
    want = adahessian_run("reference", case, step=5)
    for g, w in zip(got, want):
        assert_same(g, w)


# ---------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written

def _bad(device):
    f = lambda *s, dt=torch.float32: torch.randn(*s, device=device).to(dt)  # noqa: E731
    P = lambda: [f(3), f(4)]  # noqa: E731
    S = dict(lr=0.1, beta1=0.9, rho=0.04, weight_decay=0.0, eps=1e-12)
    sp = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (3,)).to(device)
    return {
        "state not fp32": (lambda p: ops.sophia_update_(p, P(), [f(3, dt=torch.bfloat16), f(4)], [f(3), f(4)], **S),
                           TypeError, "exp_avgs[0] has dtype"),
        "state shape": (lambda p: ops.sophia_update_(p, P(), [f(3), f(5)], [f(3), f(4)], **S),
                        ValueError, "exp_avgs[1] has shape"),
        "grad dtype": (lambda p: ops.sophia_update_(p, [f(3), f(4, dt=torch.float16)], [f(3), f(4)], [f(3), f(4)], **S),
                       TypeError, "grads[1] has dtype"),
        "list length": (lambda p: ops.sophia_update_(p, P(), [f(3)], [f(3), f(4)], **S),
                        ValueError, "exp_avgs has 1 tensors"),
        "negative lr": (lambda p: ops.sophia_update_(p, P(), [f(3), f(4)], [f(3), f(4)], **{**S, "lr": -1.0}),
                        ValueError, "lr = -1"),
        "beta1 = 1": (lambda p: ops.sophia_update_(p, P(), [f(3), f(4)], [f(3), f(4)], **{**S, "beta1": 1.0}),
                      ValueError, "beta1 = 1"),
        "rho = 0": (lambda p: ops.sophia_update_(p, P(), [f(3), f(4)], [f(3), f(4)], **{**S, "rho": 0.0}),
                    ValueError, "rho = 0"),
        "nan eps": (lambda p: ops.sophia_update_(p, P(), [f(3), f(4)], [f(3), f(4)], **{**S, "eps": float("nan")}),
                    ValueError, "eps = nan"),
        "sparse grad": (lambda p: ops.sophia_update_(p, [sp, f(4)], [f(3), f(4)], [f(3), f(4)], **S),
                        ValueError, "grads[0] is sparse"),
        "hessian_power": (lambda p: ops.adahessian_update_(p, P(), [f(3), f(4)], [f(3), f(4)], [f(3), f(4)], step=1,
                                                           lr=0.1, beta1=0.9, beta2=0.99, hessian_power=1.5),
                          ValueError, "hessian_power = 1.5"),
        "step 0": (lambda p: ops.adahessian_update_(p, P(), [f(3), f(4)], [f(3), f(4)], [f(3), f(4)], step=0,
                                                    lr=0.1, beta1=0.9, beta2=0.99),
                   ValueError, "step = 0"),
        "v length": (lambda p: ops.adahessian_update_(p, P(), [f(3), f(4)], [f(3)], [f(3), f(4)], step=1,
                                                      lr=0.1, beta1=0.9, beta2=0.99),
                     ValueError, "exp_hessian_diag_sqs has 1 tensors"),
    }


@pytest.mark.parametrize("b,device", backend_params("sophia_update_"))
@pytest.mark.parametrize("case", list(_bad("cpu")))
def test_bad_input_raises_and_writes_nothing(b, device, case):
    fn, exc, words = _bad(device)[case]
    params = [torch.randn(3, device=device), torch.randn(4, device=device)]
    before = clone(params)
    with pytest.raises(exc, match=words.replace("[", r"\[")):
        run(b, fn, params)
    assert_same(params, before)


# ---------------------------------------------------------------------------
# dispatcher integration

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("op", ["sophia_update_", "adahessian_update_"])
def test_opcheck(device, op):
    pytest.importorskip("llmopt_ext._C")
    c = make_case(torch.bfloat16, device, shapes=[(5, 3), (17,)])
    gs, fi = torch.ones(1, device=device), torch.zeros(1, device=device)
    if op == "sophia_update_":
        args = (clone(c["params"]), c["grads"], clone(c["exp_avgs"]), c["hessians"], 0.1, 0.9, 0.04, 0.1, 1e-12,
                False, gs, fi)
    else:
        args = (clone(c["params"]), c["grads"], clone(c["exp_avgs"]), clone(c["v"]), c["hut"],
                torch.tensor(2.0, device=device), 0.1, 0.9, 0.999, 0.0, 1e-4, 1.0, gs, fi)
    torch.library.opcheck(getattr(torch.ops.llmopt_ext, op).default, args)
