"""Random points on the Stiefel manifold and orthonormalisation of tall matrices.

GoLore (He et al., 2024) replaces GaLore's SVD projector by a projector drawn uniformly
(Haar) from the Stiefel manifold St(m, r) = {Q in R^{m x r}: Q^T Q = I}. The standard
construction is the Q factor of a Gaussian matrix with diag(R) > 0 (Mezzadri 2007): this
module builds it from two ops,

* ``philox_normal_(out, seed, offset)``: counter-based Gaussian generator (Philox-4x32-10,
  Box-Muller in float64): the same numbers on CPU, CUDA and the reference for a given
  (seed, offset), so a projector is reproducible from its seed on any device;
* ``orthonormalize(X)``: the Q factor with positive diag(R) of a tall matrix, by CholeskyQR2
  (two Gram + Cholesky + triangular-solve passes: GEMM-shaped work instead of Householder's
  column-by-column reflections), falling back to Householder QR when X is ill-conditioned.

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
    ``(i // 4, offset)``, key ``seed``), identical on every backend up to the last bit of a
    float64 libm call. Use distinct ``offset`` values for independent streams of one seed.
    Returns ``out``.
    """
    op = "philox_normal_"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a tensor, got {type(out).__name__}")
    _check_int(op, "seed", seed, 0)
    _check_int(op, "offset", offset, 0)
    backend.resolve(op, out.device)(out, seed, offset)
    return out


def orthonormalize(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the columns of a tall matrix ``x`` (m x r, m >= r >= 1).

    Returns the Q factor of the thin QR decomposition ``x = Q R`` with ``diag(R) > 0`` (unique
    for full-rank ``x``), in ``x``'s dtype (float32, bfloat16 or float16), contiguous. Computed
    by CholeskyQR2 (float64 on CPU and in the reference, float32 on CUDA) and by Householder QR
    when ``x`` is too ill-conditioned for it; rank-deficient ``x`` still gets orthonormal
    columns. Raises ValueError for NaN/Inf, non-2-D or wide ``x``, TypeError for other dtypes.
    """
    check_orthonormalize(x)
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
) -> torch.Tensor:
    """An m x r matrix with orthonormal columns, Haar-distributed on the Stiefel manifold.

    The Q factor (positive diag(R)) of an m x r standard Gaussian matrix from
    :func:`philox_normal_`: reproducible from ``seed`` (and ``offset``) on every device, or
    from one draw of ``generator`` when ``seed`` is None. Orthonormalised in float32 (float64
    on CPU), then cast to ``dtype``.
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
    return orthonormalize(g).to(dtype)


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
