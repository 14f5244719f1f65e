"""Property-based fuzzing of every non-LoRA op: the compiled CPU backend against the
pure-PyTorch reference on random list lengths, odd and empty shapes, non-contiguous views
and every kernel dtype. Element-wise results must be bit-identical (the numerical contract
of llmopt_ext/ops/reference.py, on both the exact=False and the exact=True path); reductions agree to one float32 rounding plus float64
summation-order noise, as in test_multi_tensor.py.

Bounded in time: derandomized, a fixed number of small examples per op (the whole file
takes ~15 s on 2 cores)."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llmopt_ext import backend, ops  # noqa: E402

from conftest import DTYPES, ULP, kernels_loaded  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels_loaded(), reason="needs _C (the CPU backend)")

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(hypothesis.HealthCheck))

LAYOUTS = ("contiguous", "transposed", "strided", "offset")
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
list_shapes = st.lists(shapes, min_size=1, max_size=5)
dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2**31 - 1)
coefs = st.floats(-4.0, 4.0, allow_nan=False)  # float64: every backend rounds it to float32


def tensor(shape, dtype, layout, gen, scale=1.0, positive=False):
    """A tensor of `shape` and `dtype` whose memory layout is `layout`: views are taken of a
    buffer already in `dtype` (a dtype conversion would make a strided view contiguous)."""
    def values(s):
        t = torch.randn(s, generator=gen)
        return ((t.abs() + 0.25 if positive else t) * scale).to(dtype)

    n_dims = len(shape)
    if layout == "transposed" and n_dims >= 2:
        return values(shape[::-1]).permute(*reversed(range(n_dims)))
    if layout == "strided" and n_dims >= 1:
        return values((*shape[:-1], 2 * shape[-1] + 1))[..., 1::2]
    if layout == "offset":
        return values((math.prod(shape) + 3,))[3:].view(shape)
    return values(shape)


def make_lists(n, shapes_, dtype, layout, seed, positive=(), dtypes_=None):
    gen = torch.Generator().manual_seed(seed)
    scale = float(torch.empty(()).uniform_(-3, 3, generator=gen).exp())  # 0.05 .. 20
    out = []
    for k in range(n):
        dt = dtypes_[k] if dtypes_ else dtype
        out.append([tensor(s, dt, layout, gen, scale, positive=k in positive) for s in shapes_])
    return out


def as_layout(ts, layout):
    """Copies of ts with the values of ts and the memory layout `layout`."""
    out = []
    for t in ts:
        buf = tensor(t.shape, t.dtype, layout, torch.Generator().manual_seed(0))
        out.append(buf.copy_(t))
    return out


def on(b, fn, *args, **kw):
    with backend.use(b):
        return fn(*args, **kw)


def assert_same(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w), f"tensor {i}: max diff {(g.double() - w.double()).abs().max()}"


def assert_close_reduction(got, want, scale):
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    tol = ULP[torch.float32] * want.double().abs() + 1e-13 * scale
    assert torch.all((got.double() - want.double()).abs() <= tol), (got, want)


def abs_scale(*ts_lists):
    return float(sum(t.double().abs().square().sum() for ts in ts_lists for t in ts)) + 1.0


def clone(ts):
    return [t.clone() for t in ts]


@FUZZ
@given(list_shapes, dtypes, layouts, seeds)
def test_fuzz_reductions(shapes_, dtype, layout, seed):
    xs, ys = make_lists(2, shapes_, dtype, layout, seed)
    assert_close_reduction(on("cpu", ops.mt_dot, xs, ys), on("reference", ops.mt_dot, xs, ys), abs_scale(xs, ys))
    assert_close_reduction(on("cpu", ops.mt_norm_sq, xs), on("reference", ops.mt_norm_sq, xs), abs_scale(xs))


@FUZZ
@given(list_shapes, dtypes, layouts, seeds, coefs, coefs, st.sampled_from(["float", "f64 tensor", "f32 tensor"]),
       st.booleans(), st.booleans())
def test_fuzz_axpby(shapes_, dtype, layout, seed, a, b, kind, aliased, exact):
    ys, xs = make_lists(2, shapes_, dtype, layout, seed)
    wrap = {"float": lambda v: v, "f64 tensor": lambda v: torch.tensor(v, dtype=torch.float64),
            "f32 tensor": lambda v: torch.tensor(v, dtype=torch.float32)}[kind]
    got, want = clone(ys), clone(ys)
    if aliased:  # xs is ys: allowed, each element read before it is written
        on("cpu", ops.mt_axpby_, got, got, wrap(a), wrap(b), exact=exact)
        on("reference", ops.mt_axpby_, want, clone(want), wrap(a), wrap(b), exact=exact)
    else:
        on("cpu", ops.mt_axpby_, got, xs, wrap(a), wrap(b), exact=exact)
        on("reference", ops.mt_axpby_, want, xs, wrap(a), wrap(b), exact=exact)
    assert_same(got, want)


@FUZZ
@given(list_shapes, dtypes, layouts, seeds, coefs, coefs, st.booleans(), st.booleans())
def test_fuzz_cg_step_and_direction(shapes_, dtype, layout, seed, alpha, beta, precond, exact):
    xs, rs, ps, hps, m = make_lists(5, shapes_, dtype, layout, seed, positive=(4,))
    minv = m if precond else None
    x1, r1, x2, r2 = clone(xs), clone(rs), clone(xs), clone(rs)
    n1 = on("cpu", ops.mt_cg_step_, x1, r1, ps, hps, alpha, minv, exact=exact)
    n2 = on("reference", ops.mt_cg_step_, x2, r2, ps, hps, alpha, minv, exact=exact)
    assert_same(x1, x2)
    assert_same(r1, r2)
    assert_close_reduction(n1, n2, abs_scale(x2, r2) * (1 + (abs_scale(minv) if precond else 0)))
    p1, p2 = as_layout(ps, layout), as_layout(ps, layout)
    on("cpu", ops.mt_cg_direction_, p1, r1, beta, minv, exact=exact)
    on("reference", ops.mt_cg_direction_, p2, r2, beta, minv, exact=exact)
    assert_same(p1, p2)


hyper_lr = st.floats(0.0, 0.5)
betas = st.floats(0.0, 0.999)


@FUZZ
@given(list_shapes, dtypes, layouts, seeds, hyper_lr, betas, st.floats(0.01, 2.0), st.floats(0.0, 0.2),
       st.booleans(), st.sampled_from([None, 1.0, 1024.0]))
def test_fuzz_sophia(shapes_, dtype, layout, seed, lr, beta1, rho, wd, clip, grad_scale):
    p, g, m, h = make_lists(4, shapes_, dtype, layout, seed, positive=(3,),
                            dtypes_=(dtype, dtype, torch.float32, torch.float32))
    kw = dict(lr=lr, beta1=beta1, rho=rho, weight_decay=wd, eps=1e-12, clip=clip,
              grad_scale=None if grad_scale is None else torch.tensor(grad_scale))
    results = []
    for b in ("cpu", "reference"):
        pc, mc = clone(p), clone(m)
        on(b, ops.sophia_update_, pc, g, mc, h, **kw)
        results.append((pc, mc))
    assert_same(results[0][0], results[1][0])
    assert_same(results[0][1], results[1][1])


@FUZZ
@given(list_shapes, dtypes, layouts, seeds, hyper_lr, betas, betas, st.floats(0.0, 0.2),
       st.integers(1, 1000), st.sampled_from([1.0, 0.5]))
def test_fuzz_adahessian(shapes_, dtype, layout, seed, lr, beta1, beta2, wd, step, k):
    p, g, m, v, d = make_lists(5, shapes_, dtype, layout, seed, positive=(3,),
                               dtypes_=(dtype, dtype, torch.float32, torch.float32, torch.float32))
    kw = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=1e-4, hessian_power=k)
    results = []
    for b in ("cpu", "reference"):
        pc, mc, vc = clone(p), clone(m), clone(v)
        on(b, ops.adahessian_update_, pc, g, mc, vc, d, **kw)
        results.append((pc, mc, vc))
    assert_same(results[0][1], results[1][1])
    assert_same(results[0][2], results[1][2])
    if k == 1.0:  # sqrt: the same bits
        assert_same(results[0][0], results[1][0])
    else:  # powf: libm and torch may differ by an ulp or two (test_optim_update.py)
        for got, want in zip(results[0][0], results[1][0]):
            ulps = 2 if dtype == torch.float32 else 1
            tol = ulps * ULP[dtype] * want.double().abs().clamp(min=1.0)
            assert torch.all((got.double() - want.double()).abs() <= tol)


@FUZZ
@given(st.integers(0, 300), st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_fuzz_philox_normal(n, seed, offset):
    got = on("cpu", ops.philox_normal_, torch.empty(n), seed, offset)
    want = on("reference", ops.philox_normal_, torch.empty(n), seed, offset)
    # float64 libm log/cos/sin may differ by an ulp before the rounding to float32
    assert torch.allclose(got, want, rtol=ULP[torch.float32], atol=0)


@FUZZ
@given(st.integers(1, 40), st.integers(1, 8), dtypes, st.sampled_from(["contiguous", "transposed", "strided"]),
       seeds)
def test_fuzz_orthonormalize(m, r, dtype, layout, seed):
    m = max(m, r)
    x = tensor((m, r), dtype, layout, torch.Generator().manual_seed(seed))
    got = on("cpu", ops.orthonormalize, x)
    want = on("reference", ops.orthonormalize, x)
    assert got.shape == want.shape == (m, r) and got.dtype == want.dtype == dtype and got.is_contiguous()
    # both CholeskyQR2 in float64, rounded once: summation order may move a rounding, so up
    # to 8 float32 ulps (test_stiefel.py), or one ulp of a 16-bit dtype, of |Q| <= 1
    tol = 8 * ULP[torch.float32] if dtype == torch.float32 else 2 * ULP[dtype]
    assert torch.allclose(got.double(), want.double(), rtol=0, atol=tol)
