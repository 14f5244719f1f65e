"""Random points on the Stiefel manifold and orthonormalisation of tall matrices.

GoLore (He et al., 2024) replaces GaLore's SVD projector by a projector drawn uniformly
(Haar) from the Stiefel manifold St(m, r) = {Q in R^{m x r}: Q^T Q = I}. The standard
construction is the Q factor of a Gaussian matrix with diag(R) > 0 (Mezzadri 2007): this
module builds it from two ops,

* ``philox_normal_(out, seed, offset)``: counter-based Gaussian generator (Philox-4x32-10,
  Box-Muller in float32 from IEEE-rounded +, *, /, sqrt only): the same bits on CPU, CUDA
  and the reference for a given (seed, offset), so a projector is reproducible from its seed
  on any device;
* ``orthonormalize(X, exact=False)``: the Q factor with positive diag(R) of a tall matrix, by
  CholeskyQR2 (two Gram + Cholesky + triangular-solve passes: GEMM-shaped work instead of
  Householder's column-by-column reflections): float32 BLAS calls by default, the backend's
  float64 kernel with ``exact=True``; Householder QR when X is ill-conditioned.

``random_stiefel(m, r)`` composes them.
"""
from __future__ import annotations

import torch

from .. import _extension, backend
from ._checks import check_orthonormalize, check_philox_normal

_BACKENDS = ("cuda", "cpu", "reference")
for _name in ("philox_normal_", "orthonormalize"):
    backend.register_op(_name, _BACKENDS)

STIEFEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED_LIMIT = 2**63  # seeds and offsets are int64 in the op schema


def _check_int(op: str, name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if not low <= value < SEED_LIMIT:
        raise ValueError(f"{op}: {name} must be in [{low}, 2**63), got {value}")
    return value


def philox_normal_(out: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """Fill contiguous float32 ``out`` in place with standard normal variates.

    Flat element ``i`` is a pure function of ``(seed, offset, i)`` (Philox-4x32-10 counter
    ``(i // 4, offset)``, key ``seed``; Box-Muller in float32 from IEEE +, *, /, sqrt only),
    identical to the bit on every backend. Use distinct ``offset`` values for independent
    streams of one seed. Returns ``out``.
    """
    op = "philox_normal_"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a tensor, got {type(out).__name__}")
    _check_int(op, "seed", seed, 0)
    _check_int(op, "offset", offset, 0)
    backend.resolve(op, out.device)(out, seed, offset)
    return out


# The float32 path hands over to the exact one when the second pass's Cholesky factor L2
# differs from I by more than this (max abs entry). L2 L2^T = W1^T W1 measures how far the
# first pass W1 is from orthonormal, ~ cond(X)^2 * 6e-8: 1e-2 admits cond(X) up to ~400, where
# the second pass still restores orthogonality to float32 rounding (Yamamoto et al. 2015).
# Gaussian projectors have cond ~ (sqrt(m)+sqrt(r))/(sqrt(m)-sqrt(r)) ~ 1.4 at 4096 x 128.
FAST_MAX_FIRST_PASS_ERROR = 1e-2


def _cholqr2_float32(x: torch.Tensor) -> torch.Tensor | None:
    """CholeskyQR2 in float32 from ATen calls, or None when X is too ill-conditioned for it.
    One host sync, at the end.

    Each pass is W <- W L^-T with G = W^T W = L L^T, done as a GEMM by the explicit inverse
    of the r x r factor (a triangular solve against I, r^3/3 flops) rather than a triangular
    solve on the m x r matrix: torch hands a row-major W to the solve as a transposed copy and
    returns column-major, so Q would need a second copy to come back contiguous. The inverse
    of a factor with cond(L) = cond(X) <= ~400 (the hand-over bound below) costs nothing in
    accuracy that CholeskyQR's own cond(X)^2 u error does not already dominate (measured equal
    orthogonality and equal distance to the float64 Q at cond 1.5-1000), and pass 2's factor
    is within 1e-2 of I. Measured on an AVX2 EPYC, 2 threads, interleaved with the
    textbook two-solve composition (which returns a column-major Q and checks nothing):
    1.24x at 1024 x 64, 1.03x at 4096 x 128, 1.10x at 14336 x 128, 0.94x at 4096 x 256.
    """
    w = x.to(torch.float32)
    eye = torch.eye(x.shape[1], dtype=torch.float32, device=x.device)
    infos = []
    for _ in range(2):
        lower, info = torch.linalg.cholesky_ex(w.mT @ w)
        infos.append(info)
        w = w @ torch.linalg.solve_triangular(lower, eye, upper=False).mT
    # lower is now L2, L2 L2^T = W1^T W1: its distance from I measures how far pass 1 left W1
    # from orthonormal. A failed factorisation (info > 0) or NaN/Inf in X fails the test too.
    first_pass_error = torch.dist(lower, eye, float("inf")) + (infos[0] + infos[1])
    if not first_pass_error.item() <= FAST_MAX_FIRST_PASS_ERROR:
        return None
    return w.to(x.dtype)


def orthonormalize(x: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
    """Orthonormal columns spanning the columns of a tall matrix ``x`` (m x r, m >= r >= 1).

    Returns the Q factor of the thin QR decomposition ``x = Q R`` with ``diag(R) > 0`` (unique
    for full-rank ``x``), in ``x``'s dtype (float32, bfloat16 or float16), contiguous.

    * ``exact=False`` (default, fastest): CholeskyQR2 in float32 from ATen calls on any device
      (``||Q^T Q - I|| ~ 1e-6``; deterministic for a given device and thread count); matrices
      with cond(X) beyond ~400 take the exact path.
    * ``exact=True``: the backend's kernel: CholeskyQR2 in float64 with a fixed summation
      order on CPU and in the reference (bit-identical between them, independent of the
      thread count), float32 on CUDA.

    Both fall back to Householder QR when ``x`` is too ill-conditioned for CholeskyQR2;
    rank-deficient ``x`` still gets orthonormal columns. Raises ValueError for NaN/Inf, non-2-D
    or wide ``x``, TypeError for other dtypes.
    """
    check_orthonormalize(x)
    if not isinstance(exact, bool):
        raise TypeError(f"orthonormalize: exact must be a bool, got {type(exact).__name__}")
    if not exact:
        q = _cholqr2_float32(x)
        if q is not None:
            return q
    return backend.resolve("orthonormalize", x.device)(x)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A seed in [0, 2**63) drawn from ``generator`` (default: torch's global CPU generator,
    so ``torch.manual_seed`` makes it reproducible)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, SEED_LIMIT - 1, (), generator=generator, device=gen_device))


def random_stiefel(
    m: int,
    r: int,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    exact: bool = False,
) -> torch.Tensor:
    """An m x r matrix with orthonormal columns, Haar-distributed on the Stiefel manifold.

    The Q factor (positive diag(R)) of an m x r standard Gaussian matrix from
    :func:`philox_normal_`: reproducible from ``seed`` (and ``offset``) on every device, or
    from one draw of ``generator`` when ``seed`` is None. Orthonormalised by
    :func:`orthonormalize` (``exact`` as there: the default float32 path is reproducible on one
    device; ``exact=True`` gives the bit-identical CPU/reference matrix), then cast to ``dtype``.
    """
    op = "random_stiefel"
    for name, v in (("m", m), ("r", r)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if r < 1:
        raise ValueError(f"{op}: r must be >= 1, got {r}")
    if r > m:
        raise ValueError(f"{op}: r={r} exceeds m={m}; an m x r matrix has at most m orthonormal columns")
    if dtype not in STIEFEL_DTYPES:
        raise TypeError(f"{op}: dtype {dtype} is not supported; expected torch.float32, torch.bfloat16 "
                        "or torch.float16")
    if seed is None:
        seed = draw_seed(generator)
    elif generator is not None:
        raise ValueError(f"{op}: pass either seed or generator, not both")
    device = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.empty((m, r), dtype=torch.float32, device=device)
    philox_normal_(g, seed, offset)
    return orthonormalize(g, exact=exact).to(dtype)


# ---------------------------------------------------------------------------
# fakes (torch.compile, FakeTensorMode, meta tensors): the reference's checks

def _fake_philox_normal_(out, seed, offset):
    check_philox_normal(out, seed, offset)


def _fake_orthonormalize(x):
    check_orthonormalize(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, as every backend


if _extension.loaded():  # _C defines the schemas the fakes attach to
    torch.library.register_fake("llmopt_ext::philox_normal_", _fake_philox_normal_)
    torch.library.register_fake("llmopt_ext::orthonormalize", _fake_orthonormalize)
