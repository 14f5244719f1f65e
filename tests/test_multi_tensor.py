"""Multi-tensor CG vector ops: every backend against the pure-PyTorch reference, the
reference against plain float64 math, bad input, opcheck and torch.compile."""
from __future__ import annotations

import math

import pytest
import torch

from llmopt_ext import backend, ops
from llmopt_ext.ops import reference

from conftest import DTYPES, HAS_CUDA, ULP, backend_params

# odd, tiny, unaligned, empty, and larger than one CPU (16384) and CUDA (8192) chunk
SHAPES = [(1,), (7,), (123,), (0,), (3, 5, 7), (4097, 5), (16, 33)]
LAYOUTS = ["contiguous", "transposed", "strided"]
# exact=False (default): float32 math for bf16/fp16 storage; exact=True: float64 math
EXACT = [False, True]


def make(shape, dtype, device, layout, gen, scale=1.0):
    if layout == "contiguous" or len(shape) < 2:
        base = torch.randn(shape, generator=gen) if layout != "strided" else torch.randn(
            (*shape[:-1], 2 * shape[-1]), generator=gen)[..., ::2]
        t = base * scale
    elif layout == "transposed":
        t = (torch.randn(shape[::-1], generator=gen) * scale).permute(*reversed(range(len(shape))))
    else:  # strided
        t = torch.randn((*shape[:-1], 2 * shape[-1]), generator=gen)[..., ::2] * scale
    t = t.to(dtype)
    if layout == "contiguous":
        t = t.contiguous()
    return t.to(device)


def make_lists(n, dtype, device, layout="contiguous", shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[make(s, dtype, device, layout, gen) for s in shapes] for _ in range(n)]


def clone(ts):
    return [t.clone() for t in ts]


def run(b, fn, *args, **kw):
    with backend.use(b):
        return fn(*args, **kw)


def flat64(ts):
    return torch.cat([t.reshape(-1).double().cpu() for t in ts])


def assert_reduction_close(got, want, scale):
    """Both sides accumulate in float64 and round once to float32: at most one float32 ulp
    apart, plus float64 summation-order noise relative to sum |terms|."""
    assert got.dtype == torch.float32 and want.dtype == torch.float32
    assert got.shape == want.shape
    tol = ULP[torch.float32] * want.double().abs().cpu() + 1e-13 * scale
    assert torch.all((got.double().cpu() - want.double().cpu()).abs() <= tol), (got, want)


def assert_same(got_list, want_list):
    for i, (g, w) in enumerate(zip(got_list, want_list)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g.cpu(), w.cpu()), f"tensor {i}: max diff {(g.double() - w.double()).abs().max()}"


# ---------------------------------------------------------------------------
# the reference against float64 math written independently

@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64_math(dtype):
    xs, ys = make_lists(2, dtype, "cpu")
    exact = float((flat64(xs) * flat64(ys)).sum())
    assert math.isclose(float(reference.mt_dot(xs, ys)), exact, rel_tol=2**-23, abs_tol=1e-9)
    assert math.isclose(float(reference.mt_norm_sq(xs)), float(flat64(xs).square().sum()), rel_tol=2**-23)
    a, b = 0.3, -1.7
    out = clone(ys)
    reference.mt_axpby_(out, xs, torch.tensor(a), torch.tensor(b))
    exact_v = float(torch.tensor(a, dtype=torch.float32)) * flat64(xs) + float(
        torch.tensor(b, dtype=torch.float32)) * flat64(ys)
    # correctly rounded: within half an ulp of the format
    err = (flat64(out) - exact_v).abs()
    assert torch.all(err <= 0.5 * ULP[dtype] * exact_v.abs() * (1 + 2**-20) + 2.0**-25)


def _np32(t):
    return t.float().numpy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precond", [False, True])
def test_reference_fast_path_matches_float32_formula(dtype, precond):
    """exact=False on 16-bit storage, against the formulas written with numpy float32 (one
    rounding per operation, no FMA), then one RNE rounding into the dtype."""
    import numpy as np  # noqa: PLC0415

    xs, ys, ps, hps, m = make_lists(5, dtype, "cpu", shapes=[(1000,), (3, 7)], seed=5)
    minv = [(t.abs() + 0.5).to(dtype) for t in m] if precond else None
    a, b, alpha, beta = np.float32(0.3), np.float32(-1.7), np.float32(-0.8125), np.float32(0.4375)

    def r16(arr, like):
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(like.dtype).reshape(like.shape)

    out = clone(ys)
    reference.mt_axpby_(out, xs, torch.tensor(0.3), torch.tensor(-1.7), exact=False)
    assert_same(out, [r16(a * _np32(x) + b * _np32(y), y) for x, y in zip(xs, ys)])

    x1, r1 = clone(xs), clone(ys)
    norms = reference.mt_cg_step_(x1, r1, ps, hps, torch.tensor(-0.8125), minv, exact=False)
    want_x = [r16(_np32(x) + alpha * _np32(p), x) for x, p in zip(xs, ps)]
    want_r = [r16(_np32(r) + alpha * _np32(hp), r) for r, hp in zip(ys, hps)]
    assert_same(x1, want_x)
    assert_same(r1, want_r)
    rv = flat64(want_r)
    rz = (rv * rv * (flat64(minv) if precond else 1.0)).sum()
    want_norms = torch.stack([flat64(want_x).square().sum(), rv.square().sum(), rz]).float()
    assert_reduction_close(norms, want_norms, float(want_norms.abs().max()))

    p1 = clone(ps)
    reference.mt_cg_direction_(p1, r1, torch.tensor(0.4375), minv, exact=False)
    want_p = []
    for i, (p, r) in enumerate(zip(ps, r1)):
        z = _np32(minv[i]) * _np32(r) if precond else _np32(r)
        want_p.append(r16(beta * _np32(p) - z, p))
    assert_same(p1, want_p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_from_f64_is_a_single_rounding(dtype):
    # Midpoints between adjacent representable values, nudged by far less than a float32 ulp:
    # float64 -> float32 -> dtype would hit an exact tie and round to even; one rounding
    # must go to the nearer neighbour.
    lo = torch.randn(4096, generator=torch.Generator().manual_seed(1)).abs().to(dtype)
    hi = (lo.view(torch.int16) + 1).view(dtype)
    mid = (lo.double() + hi.double()) / 2
    for sign in (1, -1):
        up = sign * (mid + mid * 2.0**-40)
        down = sign * (mid - mid * 2.0**-40)
        assert torch.equal(reference.round_from_f64(up, dtype), sign * hi)
        assert torch.equal(reference.round_from_f64(down, dtype), sign * lo)
    # the naive double rounding gets about half of these wrong: the test can fail
    naive = (mid + mid * 2.0**-40).float().to(dtype)
    assert (naive != hi).sum() > 1000


# ---------------------------------------------------------------------------
# every backend against the reference

@pytest.mark.parametrize("b,device", backend_params("mt_dot"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reductions(b, device, dtype, layout):
    xs, ys = make_lists(2, dtype, device, layout)
    scale = float((flat64(xs) * flat64(ys)).abs().sum())
    assert_reduction_close(run(b, ops.mt_dot, xs, ys), reference.mt_dot(xs, ys), scale)
    got = run(b, ops.mt_norm_sq, xs)
    assert got.device.type == device and got.dim() == 0
    assert_reduction_close(got, reference.mt_norm_sq(xs), float(flat64(xs).square().sum()))


def _scalar(kind, value, device):
    if kind == "float":
        return value
    if kind == "cpu-tensor":
        return torch.tensor(value, dtype=torch.float64)
    return torch.tensor(value, dtype=torch.float32, device=device)


SCALAR_KINDS = ["float", "cpu-tensor", "device-tensor"]


@pytest.mark.parametrize("b,device", backend_params("mt_axpby_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scalars", SCALAR_KINDS)
@pytest.mark.parametrize("exact", EXACT)
def test_axpby(b, device, dtype, layout, scalars, exact):
    ys, xs = make_lists(2, dtype, device, layout)
    a, c = _scalar(scalars, 0.37, device), _scalar(scalars, -1.25, device)
    got = clone(ys)
    run(b, ops.mt_axpby_, got, xs, a, c, exact=exact)
    want = clone(ys)
    reference.mt_axpby_(want, xs, torch.tensor(0.37), torch.tensor(-1.25), exact=exact)
    assert_same(got, want)
    # written through the caller's (possibly non-contiguous) views
    assert [g.stride() for g in got] == [y.stride() for y in ys] or layout == "contiguous"


@pytest.mark.parametrize("b,device", backend_params("mt_axpby_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exact", EXACT)
def test_axpby_aliased_lists(b, device, dtype, exact):
    (ys,) = make_lists(1, dtype, device)
    got, want = clone(ys), clone(ys)
    run(b, ops.mt_axpby_, got, got, 2.0, 0.3, exact=exact)
    reference.mt_axpby_(want, clone(want), torch.tensor(2.0), torch.tensor(0.3), exact=exact)
    assert_same(got, want)


@pytest.mark.parametrize("b,device", backend_params("mt_cg_step_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("precond", [False, True])
@pytest.mark.parametrize("exact", EXACT)
def test_cg_step_and_direction(b, device, dtype, layout, precond, exact):
    xs, rs, ps, hps, m = make_lists(5, dtype, device, layout)
    minv = [(t.abs() + 0.5).to(dtype) for t in m] if precond else None
    alpha = _scalar("device-tensor" if device == "cuda" else "float", -0.8125, device)

    x1, r1, x2, r2 = clone(xs), clone(rs), clone(xs), clone(rs)
    norms = run(b, ops.mt_cg_step_, x1, r1, ps, hps, alpha, minv, exact=exact)
    want = reference.mt_cg_step_(x2, r2, ps, hps, torch.tensor(-0.8125), minv, exact=exact)
    assert_same(x1, x2)
    assert_same(r1, r2)
    assert norms.shape == (3,) and norms.device.type == device
    assert_reduction_close(norms, want, float(want.double().abs().max()))
    if not precond:
        assert norms[1].item() == norms[2].item()

    p1, p2 = clone(ps), clone(ps)
    run(b, ops.mt_cg_direction_, p1, r1, 0.4375, minv, exact=exact)
    reference.mt_cg_direction_(p2, r2, torch.tensor(0.4375), minv, exact=exact)
    assert_same(p1, p2)


@pytest.mark.parametrize("b,device", backend_params("mt_dot"))
def test_lists_longer_than_one_launch(b, device):
    # 300 tensors > 256 per CUDA launch; sizes cross the lane (8) and chunk widths.
    shapes = [((i * 37) % 101 + 1,) for i in range(299)] + [(20000,)]
    xs, ys, ps, hps = make_lists(4, torch.float32, device, shapes=shapes, seed=3)
    scale = float((flat64(xs) * flat64(ys)).abs().sum())
    assert_reduction_close(run(b, ops.mt_dot, xs, ys), reference.mt_dot(xs, ys), scale)
    x1, y1, x2, y2 = clone(xs), clone(ys), clone(xs), clone(ys)
    n1 = run(b, ops.mt_cg_step_, x1, y1, ps, hps, 0.25)
    n2 = reference.mt_cg_step_(x2, y2, ps, hps, torch.tensor(0.25))
    assert_same(x1, x2)
    assert_same(y1, y2)
    assert_reduction_close(n1, n2, float(n2.abs().max()))


@pytest.mark.parametrize("b,device", backend_params("mt_dot"))
def test_all_empty_tensors(b, device):
    xs = [torch.empty(0, device=device), torch.empty(0, 3, device=device)]
    assert run(b, ops.mt_dot, xs, clone(xs)).item() == 0.0
    assert torch.equal(run(b, ops.mt_cg_step_, clone(xs), clone(xs), xs, xs, 1.0).cpu(), torch.zeros(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_results_do_not_depend_on_thread_count(dtype):
    xs, ys = make_lists(2, dtype, "cpu", shapes=[(100_000,), (7,), (40_000,)])
    saved = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((run("cpu", ops.mt_dot, xs, ys).item(), run("cpu", ops.mt_norm_sq, xs).item()))
    finally:
        torch.set_num_threads(saved)
    assert results[0] == results[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,device", backend_params("mt_axpby_"))
@pytest.mark.parametrize("exact_path", EXACT)
def test_low_precision_error_at_most_plain_pytorch(b, device, dtype, exact_path):
    """flash-attention's rule: the kernel's error against float64 is at most 2x the error of
    plain PyTorch in the same dtype (exact=True rounds once, so it is at most PyTorch's;
    exact=False adds float32 roundings, ~2^-24 of |a x| + |b y|, to that one rounding)."""
    ys, xs = make_lists(2, dtype, device, shapes=[(10_000,)], seed=7)
    a, c = 0.3, -1.1
    a32, c32 = float(torch.tensor(a, dtype=torch.float32)), float(torch.tensor(c, dtype=torch.float32))
    exact = a32 * flat64(xs) + c32 * flat64(ys)
    ours = clone(ys)
    run(b, ops.mt_axpby_, ours, xs, a, c, exact=exact_path)
    plain = [y * c + x * a for x, y in zip(xs, ys)]
    err = (flat64(ours) - exact).abs()
    err_plain = (flat64(plain) - exact).abs().max()
    assert err.max() <= 2 * err_plain
    half_ulp = 0.5 * ULP[dtype] * exact.abs() * (1 + 2**-20)
    if exact_path:
        assert err.max() <= half_ulp.max()
    else:
        f32_noise = 2.0**-23 * (abs(a32) * flat64(xs).abs() + abs(c32) * flat64(ys).abs())
        assert torch.all(err <= half_ulp + f32_noise * (1 + 2**-7))


# ---------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written

def _bad_cases(device):
    f = lambda *s, dt=torch.float32: torch.randn(*s, device=device).to(dt)  # noqa: E731
    return {
        "different lengths": (ops.mt_axpby_, lambda: ([f(3), f(4)], [f(3)], 1.0, 1.0), ValueError, "xs has 1 tensors"),
        "empty lists": (ops.mt_axpby_, lambda: ([], [], 1.0, 1.0), ValueError, "ys is an empty list"),
        "shape mismatch": (ops.mt_axpby_, lambda: ([f(4, 5)], [f(5, 4)], 1.0, 1.0), ValueError, "xs[0] has shape (5, 4)"),
        "dtype mismatch": (ops.mt_axpby_, lambda: ([f(3)], [f(3, dt=torch.bfloat16)], 1.0, 1.0), TypeError, "xs[0] has dtype torch.bfloat16"),
        "integer tensor": (ops.mt_axpby_, lambda: ([f(3)], [torch.ones(3, dtype=torch.int64, device=device)], 1.0, 1.0), TypeError, "xs[0] has dtype torch.int64"),
        "float64 tensor": (ops.mt_cg_step_, lambda: ([f(3)], [f(3)], [f(3)], [f(3, dt=torch.float64)], 1.0), TypeError, "hps[0] has dtype torch.float64"),
        "expanded output": (ops.mt_axpby_, lambda: ([f(1).expand(3)], [f(3)], 1.0, 1.0), ValueError, "ys[0] has overlapping memory"),
        "bad scalar": (ops.mt_axpby_, lambda: ([f(3)], [f(3)], torch.ones(2), 1.0), ValueError, "a must be a number"),
        "integer scalar": (ops.mt_cg_direction_, lambda: ([f(3)], [f(3)], torch.tensor(1)), TypeError, "beta has dtype torch.int64"),
        "minv length": (ops.mt_cg_step_, lambda: ([f(3), f(2)], [f(3), f(2)], [f(3), f(2)], [f(3), f(2)], 1.0, [f(3)]), ValueError, "minv has 1 tensors"),
        "not a list": (ops.mt_dot, lambda: (f(3), f(3)), TypeError, "xs must be a list"),
        "rs length": (ops.mt_cg_step_, lambda: ([f(3)], [], [f(3)], [f(3)], 1.0), ValueError, "rs has 0 tensors"),
    }


@pytest.mark.parametrize("b,device", backend_params("mt_axpby_"))
@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_input_raises_and_writes_nothing(b, device, case):
    fn, make_args, exc, words = _bad_cases(device)[case]
    args = make_args()
    before = [[t.clone() for t in a] if isinstance(a, list) else a.clone() if isinstance(a, torch.Tensor) else a
              for a in args]
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        run(b, fn, *args)
    for a, old in zip(args, before):
        if isinstance(a, list):
            assert all(torch.equal(t, o) for t, o in zip(a, old))


@pytest.mark.parametrize("b,device", backend_params("mt_axpby_"))
@pytest.mark.parametrize("bad", [1, 0, None, "yes", torch.tensor(True)])
def test_exact_must_be_a_bool(b, device, bad):
    xs, rs, ps, hps = make_lists(4, torch.bfloat16, device, shapes=[(5,)])
    before = [clone(t) for t in (xs, rs, ps)]
    calls = {
        "mt_axpby_": lambda: ops.mt_axpby_(xs, rs, 1.0, 2.0, exact=bad),
        "mt_cg_step_": lambda: ops.mt_cg_step_(xs, rs, ps, hps, 1.0, exact=bad),
        "mt_cg_direction_": lambda: ops.mt_cg_direction_(ps, rs, 0.5, exact=bad),
    }
    for op, call in calls.items():
        with backend.use(b), pytest.raises(TypeError, match=f"^{op}: exact must be a bool, got "):
            call()
    for t, old in zip((xs, rs, ps), before):
        assert_same(t, old)


def _f64_want(dtype, fn, *ts):
    """fn of the float64 values, rounded once into dtype (today's exact path, written out)."""
    return reference.round_from_f64(fn(*[t.double() for t in ts]), dtype)


@pytest.mark.parametrize("b,device", backend_params("mt_axpby_"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_flag_selects_the_path(b, device, dtype):
    """exact=True is the float64 formula with one rounding; exact=False is not (the flag is
    not ignored): element 0 is built so that 1 + c, c = half a 16-bit ulp at 1 plus 2^-30,
    rounds up from float64 but to the float32 tie 1 + 2^-k first, which RNE sends to 1."""
    half_ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    c = half_ulp + 2.0**-30  # exact in float32
    xs, ys, ps, hps, m = make_lists(5, dtype, device, shapes=[(4099,), (3, 5)], seed=9)
    minv = [(t.abs() + 0.5).to(dtype) for t in m]
    for t in (xs, ys, ps, minv):
        t[0].view(-1)[0] = 1.0
    rs = [-t for t in ys]
    results = {}
    for exact in EXACT:
        y = clone(ys)
        run(b, ops.mt_axpby_, y, xs, 1.0, c, exact=exact)
        x1, r1 = clone(xs), clone(ys)
        run(b, ops.mt_cg_step_, x1, r1, ps, hps, c, minv, exact=exact)
        p1 = clone(ps)
        run(b, ops.mt_cg_direction_, p1, rs, c, minv, exact=exact)
        results[exact] = [[t.cpu() for t in lst] for lst in (y, x1, p1)]
    X, Y, P, M, R = ([t.cpu() for t in lst] for lst in (xs, ys, ps, minv, rs))
    want = ([_f64_want(dtype, lambda x, y: x + c * y, x, y) for x, y in zip(X, Y)],
            [_f64_want(dtype, lambda x, p: x + c * p, x, p) for x, p in zip(X, P)],
            [_f64_want(dtype, lambda p, mi, r: c * p - mi * r, p, mi, r) for p, mi, r in zip(P, M, R)])
    one_up = torch.tensor(1.0 + 2 * half_ulp, dtype=dtype)
    for name, got, w, fast in zip(("axpby", "cg_step", "cg_direction"), results[True], want, results[False]):
        assert_same(got, w)  # exact=True: the float64 formula, rounded once
        assert got[0].view(-1)[0] == one_up, name
        assert fast[0].view(-1)[0] == 1.0, f"{name}: exact=False gave the exact path's bits"
    # float32 storage: the flag changes nothing
    x32, y32 = make_lists(2, torch.float32, device, shapes=[(4099,)], seed=9)
    outs = []
    for exact in EXACT:
        y = clone(y32)
        run(b, ops.mt_axpby_, y, x32, 0.3, c, exact=exact)
        outs.append(y[0])
    assert torch.equal(outs[0], outs[1])


@pytest.mark.cuda
def test_bad_input_device_mismatch():
    xs = [torch.randn(3, device="cuda")]
    before = xs[0].clone()
    with pytest.raises(ValueError, match=r"xs\[0\] is on cpu"):
        ops.mt_axpby_(xs, [torch.randn(3)], 1.0, 1.0)
    with pytest.raises(TypeError, match="must be torch.float32"):
        ops.mt_axpby_(xs, xs, torch.tensor(1.0, dtype=torch.float64, device="cuda"), 1.0)
    assert torch.equal(xs[0], before)


# ---------------------------------------------------------------------------
# dispatcher integration

def _opcheck_args(device):
    (xs, ys, ps, hps) = make_lists(4, torch.float32, device, shapes=[(5, 3), (17,)])
    minv = [t.abs() + 1 for t in ps]
    one = torch.tensor(0.5)
    return {
        "mt_dot": (xs, ys),
        "mt_norm_sq": (xs,),
        "mt_axpby_": (clone(ys), xs, one, one),
        "mt_cg_step_": (clone(xs), clone(ys), ps, hps, one, minv),
        "mt_cg_direction_": (clone(ps), ys, one, minv),
    }


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("op", ["mt_dot", "mt_norm_sq", "mt_axpby_", "mt_cg_step_", "mt_cg_direction_"])
def test_opcheck(device, op):
    pytest.importorskip("llmopt_ext._C")
    args = _opcheck_args(device)[op]
    torch.library.opcheck(getattr(torch.ops.llmopt_ext, op).default, args)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("op", ["mt_axpby_", "mt_cg_step_", "mt_cg_direction_"])
@pytest.mark.parametrize("exact", EXACT)
def test_opcheck_exact(device, op, exact):
    """The trailing `bool exact=False` of the schema, on 16-bit lists (where it matters)."""
    pytest.importorskip("llmopt_ext._C")
    args = tuple([t.to(torch.bfloat16) for t in a] if isinstance(a, list) else a
                 for a in _opcheck_args(device)[op])
    torch.library.opcheck(getattr(torch.ops.llmopt_ext, op).default, args, {"exact": exact})


def _cg_iteration(x, r, p, hp, rz):
    php = ops.mt_dot(p, hp)
    norms = ops.mt_cg_step_(x, r, p, hp, rz / php)
    ops.mt_cg_direction_(p, r, norms[2] / rz)
    return norms


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph(device):
    pytest.importorskip("llmopt_ext._C")
    x, r, p, hp = make_lists(4, torch.float32, device, shapes=[(5, 3), (17,)])
    rz = ops.mt_norm_sq(r)
    eager = [clone(t) for t in (x, r, p)]
    want = _cg_iteration(*eager, hp, rz)
    compiled = torch.compile(_cg_iteration, fullgraph=True, backend="aot_eager")
    got_lists = [clone(t) for t in (x, r, p)]
    got = compiled(*got_lists, hp, rz)
    assert torch.equal(got, want)
    for g, w in zip(got_lists, eager):
        assert_same(g, w)


@pytest.mark.parametrize("b,device", backend_params("mt_axpby_"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exact", EXACT)
def test_low_precision_stores_special_values(b, device, dtype, exact):
    """The bf16/fp16 block stores (vectorised on CPU) on results that overflow, round to
    subnormals or zero, hit ties, or are Inf/NaN, scattered among ordinary values."""
    gen = torch.Generator().manual_seed(7)
    info = torch.finfo(dtype)
    n = 4099
    x = (torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float()))
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, info.max, -info.max, info.tiny,
                            info.tiny / 8, -info.tiny / 3, info.smallest_normal * 0.75, 2.0 ** -149])
    idx = torch.randint(0, n, (300,), generator=gen)
    x[idx] = special[torch.arange(300) % len(special)]
    y = torch.randn(n, generator=gen)
    xs, ys = [x.to(dtype).to(device)], [y.to(dtype).to(device)]
    for a, c in ((0.37, -1.25), (3.0e4, 1.0), (1.5, 2.0 ** -10), (2.0 ** 100, 0.5)):
        got, want = clone(ys), clone(ys)
        run(b, ops.mt_axpby_, got, xs, a, c, exact=exact)
        reference.mt_axpby_(want, xs, torch.tensor(a), torch.tensor(c), exact=exact)
        g, w = got[0].cpu(), want[0].cpu()
        assert torch.equal(g.isnan(), w.isnan())  # NaN payloads aside, the same bits
        assert torch.equal(g.view(torch.int16)[~g.isnan()], w.view(torch.int16)[~w.isnan()])
