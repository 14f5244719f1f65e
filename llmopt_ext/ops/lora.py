"""Fused LoRA Linear and in-place LoRA merge / unmerge.

``lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out)``
computes ``y = x W^T + bias + scaling * (dropout(x) A^T) B^T`` and is differentiable with
respect to x, lora_A, lora_B and bias (W is frozen). Backends:

* ``triton`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``): the low-rank product and
  the scale-add run in the epilogue of the base GEMM; backward computes
  ``dX = dY W + s (dY B) A`` in one GEMM pass and dA, dB from the saved ``dropout(x) A^T``.
  The dropout mask is never stored: it is regenerated in backward from a Philox seed.
* ``cpu``: custom ops ``llmopt_ext::lora_linear_cpu_fwd`` / ``_bwd`` (fake:
  :func:`fused_forward_fake`). The GEMMs are ATen's; the rank-r products accumulate in
  float32 (sgemm on row blocks of bf16/fp16 x upcast, never the whole x; with dropout each
  block is masked as it is upcast, ``lora_dropout_mul_`` at the block's offset; bf16 adapters
  on bf16 x without dropout: bf16 GEMMs with float32 accumulation, as peft's). The low-rank term is computed first and the
  base GEMM accumulates onto it (``addmm``, beta = 1), so y and dX are rounded once, where
  peft rounds the base product, then the sum. Dropout is regenerated in backward from a
  Philox seed (csrc/cpu/lora_dropout.h): autograd keeps x, the (tokens x r) float32 ``t``
  and the seed; no mask, no dropped copy of x.
* ``reference``: float64 math (:func:`llmopt_ext.ops.reference.lora_linear`).

``lora_merge_`` / ``lora_unmerge_``: ``W +/- s B A`` accumulated in float32 and rounded once
into W's dtype, in place, blocked over rows (no W-sized temporary).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .. import backend
from . import reference
from ._lora_checks import check_linear, check_merge

Scalar = float | torch.Tensor

# lora_linear: declared at the end of this module, with its implementations
backend.register_op("lora_merge_", ("cuda", "cpu", "reference"))
backend.register_op("lora_unmerge_", ("cuda", "cpu", "reference"))


def _scaling_tensor(scaling: Scalar, device: torch.device) -> torch.Tensor:
    if isinstance(scaling, torch.Tensor):
        s = scaling.reshape(()).to(torch.float32)
        return s if s.device.type == "cpu" else s.to(device)
    return torch.tensor(float(scaling), dtype=torch.float32)  # CPU: read on the host, no sync


# ---------------------------------------------------------------------------
# merge / unmerge

def lora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: Scalar,
                fan_in_fan_out: bool = False) -> None:
    """In place ``weight += scaling * lora_B @ lora_A`` (``weight += scaling * (B A)^T`` when
    ``fan_in_fan_out``, i.e. weight stored (in, out)).

    The delta is accumulated in float32 and each element of weight is rounded once, so the
    merged weight is the correctly rounded ``W + D`` (peft rounds ``D`` to W's dtype first
    and then rounds the sum again). No temporary of weight's size is allocated.
    """
    _merge("lora_merge_", weight, lora_A, lora_B, scaling, fan_in_fan_out)


def lora_unmerge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: Scalar,
                  fan_in_fan_out: bool = False) -> None:
    """In place ``weight -= scaling * lora_B @ lora_A``, with the same float32 delta as
    :func:`lora_merge_`. ``unmerge(merge(W))`` is within half an ulp of the merged value
    plus half an ulp of W of the original W (the merge's rounding is the only loss)."""
    _merge("lora_unmerge_", weight, lora_A, lora_B, scaling, fan_in_fan_out)


def _merge(op: str, weight, lora_A, lora_B, scaling, fan_in_fan_out: bool) -> None:
    """Checks, backend choice and call shared by lora_merge_ / lora_unmerge_ (``op``)."""
    check_merge(op, weight, lora_A, lora_B, scaling, fan_in_fan_out)
    chosen = backend.select(op, weight.device)
    s = _scaling_tensor(scaling, weight.device)
    if chosen == "reference":
        getattr(reference, op)(weight, lora_A, lora_B, s, fan_in_fan_out)
    else:
        getattr(torch.ops.llmopt_ext, op).default(weight, lora_A, lora_B, s, fan_in_fan_out)


# ---------------------------------------------------------------------------
# lora_linear: the fake (shared by the cpu and triton custom ops) and the CPU path

def _fake_checks(x2, weight, bias, lora_A, lora_B, fan_in_fan_out: bool) -> tuple[int, int, int]:
    """The contract of the fused forward ops, for fake tensors (torch.compile, opcheck):
    (M, K) x, one device for every tensor, adapters fp32 or x's dtype. Returns (M, N, r)."""
    torch._check(x2.dim() == 2 and weight.dim() == 2, lambda: "lora_linear: x2 and weight must be 2-D")
    torch._check(lora_A.dim() == 2 and lora_B.dim() == 2, lambda: "lora_linear: lora_A, lora_B must be 2-D")
    m, k = x2.shape
    r = lora_A.shape[0]
    n = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    torch._check(k > 0, lambda: "lora_linear: in_features must be positive, got 0")
    torch._check((weight.shape[0] if fan_in_fan_out else weight.shape[1]) == k,
                 lambda: f"lora_linear: weight {tuple(weight.shape)} does not take {k} input features")
    torch._check(lora_A.shape[1] == k and tuple(lora_B.shape) == (n, r),
                 lambda: f"lora_linear: lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} "
                         f"do not match ({n}, r) x (r, {k})")
    torch._check(weight.dtype == x2.dtype, lambda: "lora_linear: weight's dtype must be x's")
    torch._check(lora_A.dtype in (torch.float32, x2.dtype) and lora_B.dtype == lora_A.dtype,
                 lambda: "lora_linear: lora_A, lora_B must both be float32 or x's dtype")
    tensors = [weight, lora_A, lora_B] + ([bias] if bias is not None else [])
    for t in tensors:
        torch._check(t.device == x2.device, lambda: f"lora_linear: tensors on {t.device} and {x2.device}")
    if bias is not None:
        torch._check(tuple(bias.shape) == (n,) and bias.dtype == x2.dtype,
                     lambda: f"lora_linear: bias must be ({n},) in x's dtype")
    return m, n, r


def fused_forward_fake(x2, weight, bias, lora_A, lora_B, scaling, scaling_f, seed, dropout_p, fan_in_fan_out):
    """Fake of the fused forward ops: (y (M, N) in x's dtype, t (M, r) float32)."""
    m, n, r = _fake_checks(x2, weight, bias, lora_A, lora_B, fan_in_fan_out)
    return x2.new_empty((m, n)), x2.new_empty((m, r), dtype=torch.float32)


def _scale_value(scaling: torch.Tensor | None, scaling_f: float) -> float:
    return float(scaling.item()) if scaling is not None else scaling_f  # CPU: no device sync


def _seed_value(seed: torch.Tensor | None) -> tuple[int, float]:
    return (int(seed.item()), 0.0) if seed is not None else (0, 0.0)


# Rows per block when bf16/fp16 x meets the float32 rank-r products without dropout: the
# block is upcast, never all of x. 2^16 elements (256 KiB, 16 rows of 4096) stay in L2 for
# the sgemm and below malloc's mmap threshold: 4 MiB blocks page-faulted a fresh buffer on
# every call (copy_ + fill_ were 14 ms of the 25 ms overhead at 4096x4096, 256 tokens).
_UPCAST_BLOCK_ELEMS = 1 << 16


# bf16 adapters on bf16 activations (no dropout): the rank-r products t = x A^T, s dY B, dA and
# dB run as bf16 GEMMs (float32 accumulation inside oneDNN, one bf16 rounding of t, g and the
# result), as peft's bf16 adapter layers do: float32 products of upcast copies made the fused
# layer 0.56x peft's speed at 4096->1024, 2048 tokens (44 ms of rank-r work against a 26 ms
# base). y and dX are still rounded once.


def _blocks(m: int, width: int):
    step = max(1, _UPCAST_BLOCK_ELEMS // max(1, width))
    return [(i, min(m, i + step)) for i in range(0, m, step)]


def _dropped(x: torch.Tensor, i: int, j: int, seed: int, p: float) -> torch.Tensor:
    """Rows i..j of ``dropout(x)`` as a new float32 block: the upcast rows times their part of
    the Philox mask (``lora_dropout_mul_`` at the block's first flat index), never all of x."""
    blk = x[i:j].to(torch.float32, copy=True)
    torch.ops.llmopt_ext.lora_dropout_mul_(blk, seed, p, i * x.shape[1])
    return blk


def _down(x: torch.Tensor, q: torch.Tensor, scale: float, seed: int, p: float) -> torch.Tensor:
    """``scale * dropout(x) @ q`` (M, r) float32 for x (M, K), q (K, r).

    Float32 sgemm on row blocks of x upcast (single-threaded, 256 x 4096: upcast 0.09 ms +
    sgemm, where a hand-written C++ product took 21 ms); with dropout, each block is masked
    from the Philox seed as it is upcast (the mask is never stored). bf16 adapters on bf16
    activations without dropout: peft's bf16 GEMM (note above _blocks)."""
    if p == 0.0 and x.dtype == q.dtype == torch.bfloat16:
        return torch.mm(x, q).to(torch.float32).mul_(scale)
    q = q.to(torch.float32)
    if p == 0.0 and x.dtype == torch.float32:
        return torch.mm(x, q).mul_(scale)
    out = torch.empty((x.shape[0], q.shape[1]), dtype=torch.float32, device=x.device)
    for i, j in _blocks(x.shape[0], x.shape[1]):
        blk = _dropped(x, i, j, seed, p) if p > 0.0 else x[i:j].to(torch.float32)
        torch.mm(blk, q, out=out[i:j])
    return out.mul_(scale)


def _reduce(g: torch.Tensor, x: torch.Tensor, seed: int, p: float, adt: torch.dtype) -> torch.Tensor:
    """``g^T @ dropout(x)`` (r, K) float32 for g (M, r) float32, x (M, K); as :func:`_down`
    (``adt``: the adapter's dtype)."""
    if p == 0.0 and x.dtype == adt == torch.bfloat16:  # bf16 adapters: peft's bf16 GEMM
        return torch.mm(g.t().to(torch.bfloat16), x).to(torch.float32)
    if p == 0.0 and x.dtype == torch.float32:
        return torch.mm(g.t(), x)
    out = x.new_zeros((g.shape[1], x.shape[1]), dtype=torch.float32)
    for i, j in _blocks(x.shape[0], x.shape[1]):
        blk = _dropped(x, i, j, seed, p) if p > 0.0 else x[i:j].to(torch.float32)
        out.addmm_(g[i:j].t(), blk)
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 and (x.shape[1] <= 1 or x.stride(1) == 1) else x.contiguous()


@torch.library.custom_op("llmopt_ext::lora_linear_cpu_fwd", mutates_args=(), device_types="cpu")
def lora_linear_cpu_fwd(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: torch.Tensor | None, scaling_f: float, seed: torch.Tensor | None,
    dropout_p: float, fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, t): t = s dropout(x2) A^T (float32, saved for backward); y = x2 W^T + (t B^T + bias).

    The low-rank term (plus bias) is computed first, rounded at its own magnitude, and the
    base GEMM accumulates onto it (addmm, beta = 1: float32 accumulator, one rounding of y).
    Adding it after the base GEMM rounded y (as before, and as peft does) costs a second
    rounding at y's magnitude: 1.15-1.4x the bf16 error of y and dX (512 -> 384 layer, measured)."""
    s = _scale_value(scaling, scaling_f)
    sd, _ = _seed_value(seed)
    p = dropout_p if seed is not None else 0.0
    x2 = _rows(x2)
    t = _down(x2, lora_A.t(), s, sd, p)
    dt = x2.dtype
    bt = lora_B.t().to(dt)
    low = torch.addmm(bias, t.to(dt), bt) if bias is not None else torch.mm(t.to(dt), bt)
    wt = weight if fan_in_fan_out else weight.t()  # (in, out)
    return low.addmm_(x2, wt), t


lora_linear_cpu_fwd.register_fake(fused_forward_fake)


@torch.library.custom_op("llmopt_ext::lora_linear_cpu_bwd", mutates_args=(), device_types="cpu")
def lora_linear_cpu_bwd(
    dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    t: torch.Tensor, scaling: torch.Tensor | None, scaling_f: float, seed: torch.Tensor | None,
    dropout_p: float, fan_in_fan_out: bool, need_x: bool, need_ab: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB); dx is empty unless need_x, dA and dB unless need_ab. The mask is
    regenerated from the seed (never stored); dx = (s (dY B) A) * mask / (1 - p) + dY W with
    the same one-rounding order as the forward."""
    s = _scale_value(scaling, scaling_f)
    sd, _ = _seed_value(seed)
    p = dropout_p if seed is not None else 0.0
    dy, x2 = _rows(dy), _rows(x2)
    g = _down(dy, lora_B, s, 0, 0.0)  # s dY B: (tokens, r) float32
    # three distinct empties: outputs of a custom op may not alias one another
    dx, da, db = (x2.new_empty((0,)) for _ in range(3))
    if need_x:
        dt = dy.dtype
        low = torch.mm(g.to(dt), lora_A.to(dt))
        if p > 0.0:
            torch.ops.llmopt_ext.lora_dropout_mul_(low, sd, p)
        w = weight.t() if fan_in_fan_out else weight  # (out, in)
        dx = low.addmm_(dy, w)
    if need_ab:
        da = _reduce(g, x2, sd, p, lora_A.dtype).to(lora_A.dtype)  # (r, in) = (s dY B)^T dropout(x)
        db = _reduce(t, dy, 0, 0.0, lora_B.dtype).t().contiguous().to(lora_B.dtype)  # (out, r) = dY^T t
    return dx, da, db


@lora_linear_cpu_bwd.register_fake
def _(dy, x2, weight, lora_A, lora_B, t, scaling, scaling_f, seed, dropout_p, fan_in_fan_out, need_x, need_ab):
    none = x2.new_empty((0,))
    return (torch.empty_like(x2) if need_x else none, torch.empty_like(lora_A) if need_ab else none,
            torch.empty_like(lora_B) if need_ab else none)


def _cpu_setup_context(ctx, inputs, output):
    x2, weight, bias, lora_A, lora_B, scaling, scaling_f, seed, dropout_p, fan_in_fan_out = inputs
    ctx.save_for_backward(x2, weight, lora_A, lora_B, output[1], scaling, seed)
    ctx.scaling_f, ctx.dropout_p, ctx.fan_in_fan_out = scaling_f, dropout_p, fan_in_fan_out
    ctx.has_bias = bias is not None


def _backward_composed(ctx, dy, x2, weight, lora_A, lora_B, scaling, seed):
    """The backward as differentiable ATen ops, for double backward (create_graph=True: the
    Hessian-vector products of AdaHessian / SophiaH / TRCG). Float32 products of the whole x
    (this path is not the memory-lean one); the mask is the forward's, regenerated."""
    s = scaling.reshape(()) if scaling is not None else ctx.scaling_f
    xd = x2
    mask = None
    if seed is not None:
        mask = torch.ones_like(x2)
        torch.ops.llmopt_ext.lora_dropout_mul_(mask, int(seed.item()), ctx.dropout_p)
        xd = x2 * mask
    adt = lora_A.dtype
    t = (xd.to(adt) @ lora_A.t()) * s
    g = (dy.to(adt) @ lora_B) * s
    w = weight.t() if ctx.fan_in_fan_out else weight  # (out, in)
    low = g @ lora_A
    dx = dy @ w + (low * mask if mask is not None else low).to(dy.dtype)
    return dx, (g.t() @ xd.to(adt)).to(adt), (dy.to(adt).t() @ t).to(lora_B.dtype)


def _cpu_backward(ctx, dy, _dt):
    x2, weight, lora_A, lora_B, t, scaling, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: the custom bwd op has no derivative
        dx, da, db = _backward_composed(ctx, dy, x2, weight, lora_A, lora_B, scaling, seed)
        dbias = dy.sum(0) if ctx.has_bias and need[2] else None
        return (dx if need[0] else None, None, dbias, da if need[3] else None, db if need[4] else None,
                None, None, None, None, None)
    need_ab = need[3] or need[4]
    dx, da, db = lora_linear_cpu_bwd(dy, x2, weight, lora_A, lora_B, t, scaling, ctx.scaling_f, seed,
                                     ctx.dropout_p, ctx.fan_in_fan_out, need[0], need_ab)
    dbias = dy.sum(0) if ctx.has_bias and need[2] else None
    return (dx if need[0] else None, None, dbias, da if need[3] else None, db if need[4] else None,
            None, None, None, None, None)


lora_linear_cpu_fwd.register_autograd(_cpu_backward, setup_context=_cpu_setup_context)


def fused_scalars(scaling: Scalar, dropout_p: float, training: bool, device: torch.device):
    """(scaling tensor or None, scaling float, seed tensor or None) for the fused ops. The seed
    is one int64 drawn from torch's default generator, so torch.manual_seed governs the mask."""
    if isinstance(scaling, torch.Tensor):
        s_t, s_f = scaling.reshape(1).to(device=device, dtype=torch.float32), 0.0
    else:
        s_t, s_f = None, float(scaling)
    seed = None
    if dropout_p > 0.0 and training:
        seed = torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)  # tl.rand's range
    return s_t, s_f, seed


def _lora_linear_cpu(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out):
    x2 = x.reshape(-1, x.shape[-1])
    s_t, s_f, seed = fused_scalars(scaling, dropout_p, training, x.device)
    y, _ = lora_linear_cpu_fwd(x2, weight, bias, lora_A, lora_B, s_t, s_f, seed, float(dropout_p),
                               bool(fan_in_fan_out))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _autocast_inputs(x, weight, bias):
    """Under torch.autocast (bf16/fp16) for x's device: x, W and bias in the autocast dtype,
    as autocast would give peft's base F.linear; the adapters keep their own dtype."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, bias, None
    amp = torch.get_autocast_dtype(dev)
    if amp not in (torch.bfloat16, torch.float16):
        return x, weight, bias, None
    cast = lambda t: t.to(amp) if t is not None and t.dtype.is_floating_point else t  # noqa: E731
    return cast(x), cast(weight), cast(bias), dev


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: Scalar,
    dropout_p: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``y = x W^T + bias + scaling * (dropout(x) A^T) B^T`` with any leading dims of x.

    Args:
        x: (..., in_features), float32 / bfloat16 / float16, the dtype of weight.
        weight: (out, in) — or (in, out) with ``fan_in_fan_out`` (GPT-2 Conv1D) — frozen.
        bias: (out,) or None; gets a gradient when it requires one.
        lora_A: (r, in); lora_B: (out, r); float32 or x's dtype (both the same).
        scaling: float or one-element tensor (peft's hotswap makes it a tensor).
        dropout_p, training: dropout on the adapter branch's input (only when training).
    Returns: (..., out_features) in x's dtype.
    """
    op = "lora_linear"
    x, weight, bias, amp_device = _autocast_inputs(x, weight, bias)
    check_linear(op, x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    impl = backend.resolve(op, x.device)
    args = (x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out)
    with torch.autocast(amp_device, enabled=False) if amp_device else contextlib.nullcontext():
        return impl(*args)


# lora_linear is a Python function over the custom ops above (CPU) or the Triton kernels; its
# implementations are declared so backend.resolve picks them like every other op's (the CPU
# one as a function object: torch.compile traces lora_linear and cannot trace an import)
backend.register_op("lora_linear", ("triton", "cpu", "reference"),
                    {"cpu": _lora_linear_cpu, "triton": "llmopt_ext.ops.triton.lora:lora_linear",
                     "reference": reference.lora_linear})


# ---------------------------------------------------------------------------
# DoRA: the row norms of W + s B A in low rank

def _row_blocks(w: torch.Tensor):
    """Row blocks of a 2-D w to upcast one at a time (through one reused buffer): on the CPU
    2^20 elements (4 MiB in float32, 256 rows of 4096) -- W A^T is an (out, r) product, and
    sgemm on the 16-row L2 blocks of :func:`_blocks` ran it at ~2/3 speed (4096x4096 bf16 W,
    r = 16, one thread, same run: 16-row blocks 19.0 ms, 256-row blocks 13.2 ms, one whole
    upcast 43 ms); on an accelerator 2^24 elements (64 MiB)."""
    elems = 1 << 20 if w.device.type == "cpu" else 1 << 24
    step = max(1, elems // max(1, w.shape[1]))
    return [(i, min(w.shape[0], i + step)) for i in range(0, w.shape[0], step)]


def _upcast_rows(w: torch.Tensor, blocks) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(i, j, float32 copy of w[i:j]) for each block, through one reused buffer."""
    if not blocks:  # a W with no rows
        return
    buf = torch.empty((blocks[0][1] - blocks[0][0], w.shape[1]), dtype=torch.float32, device=w.device)
    for i, j in blocks:
        yield i, j, buf[: j - i].copy_(w[i:j])


def weight_row_norm_sq(weight: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """``||W_j||^2`` per output row j, float32 (out,), as the square of the norm peft takes
    for DoRA (``torch.linalg.norm(W^(T) + 0, dim=1)`` over float32 values, W in the layout
    peft's sum has): at B = 0 :func:`dora_weight_norm` returns exactly that norm (the sum
    adds exact zeros and sqrt(fl(x^2)) = |x| in binary floating point), so a DoRA adapter
    at its initialisation (magnitude = that norm) is exactly the identity rescaling, as in
    peft. Allocates two float32 (out, in) temporaries: meant to be cached (W is frozen)."""
    w = weight.detach()
    wo = w.t() if fan_in_fan_out else w
    full = wo.to(torch.float32) + torch.zeros(wo.shape, dtype=torch.float32, device=w.device)
    return torch.linalg.norm(full, dim=1).square_()


def _weight_times_At(w: torch.Tensor, a: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``W A^T`` (out, r) float32 for a float32 A (r, in) and W (out, in), or W (in, out) with
    ``fan_in_fan_out``; W is upcast by row blocks when it is not float32."""
    if w.dtype == torch.float32:
        return torch.mm(a, w).t() if fan_in_fan_out else torch.mm(w, a.t())
    if fan_in_fan_out:  # sum over W's row blocks of A[:, rows] @ W[rows]: (r, out)
        out = None
        for i, j, wb in _upcast_rows(w, _row_blocks(w)):
            part = torch.mm(a[:, i:j], wb)
            out = part if out is None else out.add_(part)
        return out.t()
    out = torch.empty((w.shape[0], a.shape[0]), dtype=torch.float32, device=w.device)
    for i, j, wb in _upcast_rows(w, _row_blocks(w)):
        torch.mm(wb, a.t(), out=out[i:j])
    return out


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: Scalar,
                     fan_in_fan_out: bool = False, weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA's ``||W + s B A||`` per output row, float32 (out,), without forming ``W + s B A``.

    For output row j (W_j: (in,), B_j: (r,)):

        ||W_j + s B_j A||^2 = ||W_j||^2 + 2 s (W_j A^T) . B_j + s^2 B_j (A A^T) B_j^T

    i.e. ``weight_sq + 2 s rowsum((W A^T) * B) + s^2 rowsum((B (A A^T)) * B)``. ``W A^T`` is
    (out, r): out*in*r multiply-adds (r/tokens of the base GEMM's); ``A A^T`` is (r, r). peft
    materialises the (out, in) sum and takes its norm on every forward. ``weight_sq`` is
    :func:`weight_row_norm_sq` (cache it: W is frozen). Everything runs in float32 (bf16 W
    upcast by row blocks for W A^T); the result is clamped at 0 before the square root, since
    the expansion can round a (near-)zero row below 0. Relative rounding of the squared norm
    is about eps32 * (||W_j||^2 + 2|s W_j.(B_j A)| + s^2 ||B_j A||^2) / ||W_j + s B_j A||^2,
    which is eps32-sized unless the adapter nearly cancels W's row (then the norm itself is
    only good to about sqrt(eps32) ||W_j||, absolute; test_dora_weight_norm_cancelling_row
    measures it). No gradient: DoRA detaches this norm (DoRA paper, section 4.3; peft does
    the same)."""
    with torch.no_grad():
        w = weight.detach()
        a = lora_A.detach().to(torch.float32)
        b = lora_B.detach().to(torch.float32)
        if weight_sq is None:
            weight_sq = weight_row_norm_sq(w, fan_in_fan_out)
        wa = _weight_times_At(w, a, fan_in_fan_out)  # (out, r)
        s = scaling.reshape(()).to(device=w.device, dtype=torch.float32) if isinstance(scaling, torch.Tensor) \
            else float(scaling)
        cross = (wa * b).sum(1)
        quad = ((b @ (a @ a.t())) * b).sum(1)
        return (weight_sq + (2 * s) * cross + (s * s) * quad).clamp_min_(0.0).sqrt_()
