"""Random Stiefel matrices: the Philox Gaussian generator and CholeskyQR2 orthonormalisation,
every backend against the reference, the reference against independent math (Householder QR,
Haar statistics), determinism, bad input and opcheck."""
from __future__ import annotations

import math

import pytest
import torch

from llmopt_ext import backend, ops
from llmopt_ext.ops import reference

from conftest import DTYPES, ULP, backend_params


def run(b, fn, *args, **kwargs):
    with backend.use(b):
        return fn(*args, **kwargs)


def ortho_error(q: torch.Tensor) -> float:
    q = q.double().cpu()
    return float((q.mT @ q - torch.eye(q.shape[1], dtype=torch.float64)).abs().max())


def householder_q(x: torch.Tensor) -> torch.Tensor:
    """Independent oracle: float64 Householder QR with diag(R) made positive."""
    q, r = torch.linalg.qr(x.double().cpu())
    return q * torch.where(r.diagonal() < 0, -1.0, 1.0)


def make(shape, dtype, device, layout, seed=0, cond=None):
    gen = torch.Generator().manual_seed(seed)
    m, r = shape
    if cond is not None:  # X = U diag(s) V^T with singular values from 1 down to 1/cond
        u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
        s = torch.logspace(0, -math.log10(cond), r, dtype=torch.float64)
        x = (u * s) @ v.mT
    else:
        x = torch.randn(m, r, generator=gen)
    x = x.to(dtype).to(device)
    if layout == "transposed":
        x = x.mT.contiguous().mT
    elif layout == "strided":
        buf = torch.zeros(m, 2 * r, dtype=dtype, device=device)
        buf[:, ::2] = x
        x = buf[:, ::2]
    return x


SHAPES = [(1, 1), (7, 3), (123, 17), (4097, 5), (64, 64), (300, 200)]
LAYOUTS = ["contiguous", "transposed", "strided"]


# ---------------------------------------------------------------------------
# Philox Gaussian generator

def test_reference_philox_known_answer():
    # Philox-4x32-10 known-answer vectors (Random123's kat_vectors): counter 0 / key 0 and
    # counter all-ones / key all-ones.
    def words(c, k):
        t = [torch.tensor([x], dtype=torch.int64) for x in c]
        return [int(w) for w in reference.philox4x32(*t, *k)]
    assert words([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert words([ones] * 4, [ones, ones]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("b,device", backend_params("philox_normal_"))
@pytest.mark.parametrize("n", [1, 3, 4, 7, 123, 4097 * 3])
def test_philox_matches_reference(b, device, n):
    for seed, offset in [(0, 0), (12345, 7), (2**63 - 1, 2**40 + 3)]:
        got = torch.empty(n, device=device)
        run(b, ops.philox_normal_, got, seed, offset)
        want = torch.empty(n)
        reference.philox_normal_(want, seed, offset)
        # float32 Box-Muller from IEEE-rounded +, *, /, sqrt in one fixed order: every bit equal
        assert torch.equal(got.cpu(), want), (seed, offset)


def test_philox_box_muller_accuracy():
    # The float32 transform (own log, sin, cos) against float64 Box-Muller of the same
    # uniforms, over 2^20 Philox pairs plus the extreme words: within a few float32 ulps.
    blocks = torch.arange(1 << 18, dtype=torch.int64)
    words = reference.philox4x32(blocks, blocks * 0, blocks * 0 + 3, blocks * 0, 17, 0)
    edge = torch.tensor([0, 1, 511, 512, 2**31 - 1, 2**31, 2**32 - 512, 2**32 - 1], dtype=torch.int64)
    a = torch.cat([words[0], words[2], edge, edge.flip(0)])
    b = torch.cat([words[1], words[3], edge.flip(0), edge])
    z0, z1 = reference.box_muller_f32(a, b)
    u = (2 * (a >> 9) + 1).double() * 2.0**-24
    theta = ((b >> 30).double() + (2 * ((b >> 7) & 0x7FFFFF) + 1).double() * 2.0**-24) * (math.pi / 2)
    rho = torch.sqrt(-2 * torch.log(u))
    for got, want in ((z0, rho * torch.cos(theta)), (z1, rho * torch.sin(theta))):
        # relative to the pair's radius: cos/sin near zero have no relative accuracy to keep
        err = (got.double() - want).abs() / (rho * ULP[torch.float32])
        assert float(err.max()) < 4, float(err.max())
    assert float(rho.max()) == pytest.approx(math.sqrt(-2 * math.log(2.0**-24)))


def test_philox_prefix_and_streams():
    a = torch.empty(1001)
    ops.philox_normal_(a, 5, 0)
    b = torch.empty(10, 7)  # element i depends only on (seed, offset, i): any shape, same prefix
    ops.philox_normal_(b, 5, 0)
    assert torch.equal(a[:70], b.reshape(-1))
    c = torch.empty(1001)
    ops.philox_normal_(c, 5, 1)
    d = torch.empty(1001)
    ops.philox_normal_(d, 6, 0)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_philox_statistics():
    z = torch.empty(400_000, dtype=torch.float32)
    ops.philox_normal_(z, 99, 0)
    z = z.double()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((z**3).mean())) < 5 * math.sqrt(15 / n)  # skewness 0
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96 / n)  # kurtosis 3
    # tail mass beyond 2 sigma: 4.55%
    assert abs(float((z.abs() > 2).double().mean()) - 0.0455) < 0.002
    # neighbours (Box-Muller pairs and Philox lanes) uncorrelated
    assert abs(float((z[:-1] * z[1:]).mean())) < 5 / math.sqrt(n)


def test_philox_thread_count_independent():
    a, b = torch.empty(300_000), torch.empty(300_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ops.philox_normal_(a, 3, 4)
    finally:
        torch.set_num_threads(threads)
    ops.philox_normal_(b, 3, 4)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# orthonormalize

@pytest.mark.parametrize("b,device", backend_params("orthonormalize"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_orthonormalize(b, device, dtype, shape, layout):
    x = make(shape, dtype, device, layout, seed=shape[0] + shape[1])
    q = run(b, ops.orthonormalize, x, exact=True)
    assert q.shape == x.shape and q.dtype == dtype and q.device == x.device and q.is_contiguous()
    exact = householder_q(x)
    # flash-attention's rule: at most ~2x the error of the exact factor rounded to dtype
    rounded = exact.to(dtype).double()
    err_q = float((q.double().cpu() - exact).abs().max())
    err_base = float((rounded - exact).abs().max())
    # CPU and the reference compute in float64 (one rounding at the end); CUDA runs CholeskyQR2
    # in float32 (error ~ cond(X) * 6e-8 before the final rounding).
    slack = 64 * ULP[torch.float32] if b != "cuda" else 1e-4
    assert err_q <= 2 * err_base + slack, (err_q, err_base)
    assert ortho_error(q) <= 2 * ortho_error(rounded) + slack
    if dtype == torch.float32:  # and against the reference directly
        want = reference.orthonormalize(x.cpu())
        assert torch.allclose(q.cpu(), want, rtol=0, atol=8 * ULP[torch.float32] if b != "cuda" else 1e-4)


@pytest.mark.parametrize("b,device", backend_params("orthonormalize"))
@pytest.mark.parametrize("cond", [1e3, 1e5, 1e9, 1e14])
@pytest.mark.parametrize("exact", [False, True])
def test_orthonormalize_ill_conditioned(b, device, cond, exact):
    x = make((200, 30), torch.float32, device, "contiguous", seed=3, cond=cond)
    q = run(b, ops.orthonormalize, x, exact=exact)
    assert ortho_error(q) < 1e-5  # Householder fallback keeps Q orthonormal at any cond
    # Q spans X: the residual of projecting X on span(Q) is at rounding level
    xd = x.double().cpu()
    qd = q.double().cpu()
    assert float((xd - qd @ (qd.mT @ xd)).abs().max()) < 1e-5 * float(xd.abs().max())


@pytest.mark.parametrize("b,device", backend_params("orthonormalize"))
@pytest.mark.parametrize("exact", [False, True])
def test_orthonormalize_rank_deficient(b, device, exact):
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    x[:, 2] = 0  # zero column
    x[:, 4] = x[:, 1]  # repeated column
    q = run(b, ops.orthonormalize, x.to(device), exact=exact)
    assert ortho_error(q) < 1e-5
    qd = q.double().cpu()
    assert float((x.double() - qd @ (qd.mT @ x.double())).abs().max()) < 1e-5


def test_orthonormalize_thread_count_independent():
    x = torch.randn(3000, 70, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.orthonormalize(x, exact=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, ops.orthonormalize(x, exact=True))


@pytest.mark.parametrize("b,device", backend_params("orthonormalize"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 128)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_orthonormalize_fast_default(b, device, dtype, shape, layout):
    # exact=False: float32 CholeskyQR2 from BLAS calls. Bounds against Householder QR in
    # float64: forward error ~ cond(X) * r * 6e-8 and orthogonality ~ r * 6e-8 before the final
    # rounding (measured <= 3e-6 at 4096 x 128), plus 2x the error of rounding to dtype.
    x = make(shape, dtype, device, layout, seed=shape[0] + 3 * shape[1])
    q = run(b, ops.orthonormalize, x)
    assert q.shape == x.shape and q.dtype == dtype and q.device == x.device and q.is_contiguous()
    exact = householder_q(x)
    rounded = exact.to(dtype).double()
    slack = 1e-6 * max(1.0, shape[1] / 8)
    assert float((q.double().cpu() - exact).abs().max()) <= 2 * float((rounded - exact).abs().max()) + slack
    assert ortho_error(q) <= 2 * ortho_error(rounded) + slack
    # same device, same call: the same bits
    assert torch.equal(q, run(b, ops.orthonormalize, x))


def test_orthonormalize_fast_matches_linalg_qr_bound():
    # the default against torch.linalg.qr (float32 Householder, LAPACK): orthogonality no worse
    # than 4x linalg.qr's own at the benchmark shapes
    for m, r in ((1024, 64), (4096, 128)):
        x = torch.randn(m, r, generator=torch.Generator().manual_seed(m + r))
        q_ref, _ = torch.linalg.qr(x)
        assert ortho_error(ops.orthonormalize(x)) <= 4 * ortho_error(q_ref) + 1e-7


def test_orthonormalize_fast_hands_over_when_ill_conditioned():
    # cond 1e4: the float32 first pass leaves W1^T W1 - I ~ 1 > 1e-2, so the exact kernel runs
    from llmopt_ext.ops import stiefel

    x = make((200, 30), torch.float32, "cpu", "contiguous", seed=3, cond=1e4)
    assert stiefel._cholqr2_float32(x) is None
    assert torch.equal(ops.orthonormalize(x), ops.orthonormalize(x, exact=True))
    y = make((200, 30), torch.float32, "cpu", "contiguous", seed=3, cond=10)
    assert stiefel._cholqr2_float32(y) is not None


# ---------------------------------------------------------------------------
# random_stiefel

@pytest.mark.parametrize("b,device", backend_params("orthonormalize"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,r", [(1, 1), (3, 1), (7, 7), (123, 5), (4097, 3), (500, 128)])
def test_random_stiefel_orthonormal(b, device, dtype, m, r):
    q = run(b, ops.random_stiefel, m, r, seed=m * 31 + r, dtype=dtype, device=device)
    assert q.shape == (m, r) and q.dtype == dtype and q.device.type == device
    exact = run(b, ops.random_stiefel, m, r, seed=m * 31 + r, dtype=torch.float32, device=device)
    tol = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype] * max(1.0, math.sqrt(r) / 4)
    assert ortho_error(q) <= tol
    assert ortho_error(exact) <= 2e-6 * max(1.0, math.sqrt(r) / 4)


def test_random_stiefel_backends_agree():
    want = run("reference", ops.random_stiefel, 257, 19, seed=77, offset=3, exact=True)
    got = run("cpu", ops.random_stiefel, 257, 19, seed=77, offset=3, exact=True)
    assert torch.allclose(got, want, rtol=0, atol=8 * ULP[torch.float32])
    # it is the positive-diagonal QR factor of the Philox Gaussian matrix
    g = torch.empty(257, 19)
    reference.philox_normal_(g, 77, 3)
    assert torch.allclose(got.double(), householder_q(g), rtol=0, atol=1e-5)


def test_random_stiefel_determinism():
    a = ops.random_stiefel(100, 10, seed=42)
    assert torch.equal(a, ops.random_stiefel(100, 10, seed=42))
    assert not torch.equal(a, ops.random_stiefel(100, 10, seed=43))
    assert not torch.equal(a, ops.random_stiefel(100, 10, seed=42, offset=1))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    b = ops.random_stiefel(100, 10, generator=g1)
    assert torch.equal(b, ops.random_stiefel(100, 10, generator=g2))
    assert not torch.equal(b, ops.random_stiefel(100, 10, generator=g1))  # the generator advanced
    torch.manual_seed(3)
    c = ops.random_stiefel(100, 10)
    torch.manual_seed(3)
    assert torch.equal(c, ops.random_stiefel(100, 10))


def test_haar_statistics_sphere():
    # m=3, r=1: the column is uniform on the sphere S^2: mean 0, covariance I/3, each
    # coordinate uniform on [-1, 1] (Archimedes), signs balanced.
    n = 3000
    qs = torch.stack([ops.random_stiefel(3, 1, seed=s)[:, 0] for s in range(n)]).double()
    assert float(qs.mean(0).abs().max()) < 5 * math.sqrt(1 / 3 / n)
    cov = qs.mT @ qs / n
    assert float((cov - torch.eye(3, dtype=torch.float64) / 3).abs().max()) < 5 * math.sqrt(2 / 15 / n) * 1.5
    assert abs(float((qs[:, 0] > 0).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(n)
    # Kolmogorov-Smirnov against U[-1, 1] for the first coordinate
    x = qs[:, 0].sort().values
    cdf = (x + 1) / 2
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float((cdf - emp).abs().max()) < 1.63 / math.sqrt(n)  # 1% level


def test_haar_statistics_frame():
    # m=4, r=2: E[Q Q^T] = (r/m) I and diag(Q) signs balanced (an uncorrected Householder
    # QR of a Gaussian has Q[0, 0] < 0 almost always: this test catches that).
    n = 2000
    qs = torch.stack([ops.random_stiefel(4, 2, seed=10_000 + s) for s in range(n)]).double()
    proj = (qs @ qs.mT).mean(0)
    assert float((proj - 0.5 * torch.eye(4, dtype=torch.float64)).abs().max()) < 0.03
    for i in range(2):
        assert abs(float((qs[:, i, i] > 0).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(n)
    # invariance: the distribution of Q and of H Q (H a fixed rotation) agree in their moments
    h, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    hq = h @ qs
    assert float((hq[:, :, 0].abs().mean(0) - qs[:, :, 0].abs().mean(0)).abs().max()) < 0.03


# ---------------------------------------------------------------------------
# bad input: a clear error, nothing written

@pytest.mark.parametrize("b,device", backend_params("orthonormalize"))
def test_orthonormalize_bad_input(b, device):
    cases = [
        (torch.randn(5, device=device), ValueError, "2-D"),
        (torch.randn(2, 5, 3, device=device), ValueError, "2-D"),
        (torch.randn(3, 5, device=device), ValueError, "tall"),
        (torch.randn(3, 0, device=device), ValueError, "at least one column"),
        (torch.randn(6, 3, device=device).double(), TypeError, "dtype"),
        (torch.ones(6, 3, dtype=torch.int32, device=device), TypeError, "dtype"),
    ]
    for x, exc, words in cases:
        with pytest.raises(exc, match=words):
            run(b, ops.orthonormalize, x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(9, 4, device=device)
        x[5, 2] = bad
        before = x.clone()
        for exact in (False, True):
            with pytest.raises(ValueError, match="NaN or Inf"):
                run(b, ops.orthonormalize, x, exact=exact)
        assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())


def test_orthonormalize_exact_must_be_bool():
    with pytest.raises(TypeError, match="exact"):
        ops.orthonormalize(torch.randn(5, 2), exact=1)


@pytest.mark.parametrize("b,device", backend_params("philox_normal_"))
def test_philox_bad_input(b, device):
    with pytest.raises(TypeError, match="float32"):
        run(b, ops.philox_normal_, torch.empty(4, dtype=torch.float16, device=device), 1, 0)
    with pytest.raises(ValueError, match="contiguous"):
        run(b, ops.philox_normal_, torch.empty(4, 4, device=device).mT, 1, 0)
    out = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match="seed"):
        run(b, ops.philox_normal_, out, -1, 0)
    with pytest.raises(ValueError, match="offset"):
        run(b, ops.philox_normal_, out, 1, -2)
    with pytest.raises(TypeError, match="seed"):
        run(b, ops.philox_normal_, out, 1.5, 0)
    assert torch.equal(out, torch.zeros(4, device=device))


def test_random_stiefel_bad_input():
    with pytest.raises(ValueError, match="exceeds m"):
        ops.random_stiefel(3, 4, seed=0)
    with pytest.raises(ValueError, match=">= 1"):
        ops.random_stiefel(3, 0, seed=0)
    with pytest.raises(ValueError, match=">= 1"):
        ops.random_stiefel(3, -2, seed=0)
    with pytest.raises(TypeError, match="int"):
        ops.random_stiefel(3.0, 2, seed=0)
    with pytest.raises(TypeError, match="dtype"):
        ops.random_stiefel(3, 2, seed=0, dtype=torch.int64)
    with pytest.raises(ValueError, match="either seed or generator"):
        ops.random_stiefel(3, 2, seed=0, generator=torch.Generator())


# ---------------------------------------------------------------------------
# dispatcher contract

@pytest.mark.skipif(not backend.available()["cpu"], reason="_C not loaded")
def test_opcheck():
    x = torch.randn(37, 6)
    torch.library.opcheck(torch.ops.llmopt_ext.orthonormalize.default, (x,))
    torch.library.opcheck(torch.ops.llmopt_ext.orthonormalize.default, (x.to(torch.bfloat16),))
    torch.library.opcheck(torch.ops.llmopt_ext.philox_normal_.default, (torch.empty(5, 3), 11, 2))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    a = ops.random_stiefel(4096, 64, seed=9, device="cuda")
    b = ops.random_stiefel(4096, 64, seed=9, device="cpu")
    assert torch.allclose(a.cpu(), b, rtol=0, atol=1e-5)
    g_cuda = torch.empty(10_001, device="cuda")
    g_cpu = torch.empty(10_001)
    ops.philox_normal_(g_cuda, 5, 6)
    ops.philox_normal_(g_cpu, 5, 6)
    assert torch.equal(g_cuda.cpu(), g_cpu)
