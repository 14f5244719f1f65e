"""Fused LoRA Linear and in-place LoRA merge / unmerge.

``lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out)``
computes ``y = x W^T + bias + scaling * (dropout(x) A^T) B^T`` and is differentiable with
respect to x, lora_A, lora_B and bias (W is frozen). Backends:

* ``triton`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``): the low-rank product and
  the scale-add run in the epilogue of the base GEMM; backward computes
  ``dX = dY W + s (dY B) A`` in one GEMM pass and dA, dB from the saved ``dropout(x) A^T``.
  The dropout mask is never stored: it is regenerated in backward from a Philox seed.
* ``cpu``: composed ATen calls (:func:`_lora_linear_aten`): one addmm for base + bias, the
  low-rank product with the scale applied to the (tokens x r) intermediate, and its add
  fused into a second addmm, so no pass over the (tokens x out) output beyond the GEMMs.
  fp32 adapters with a bf16/fp16 x never materialise an fp32 copy of x (row blocks are
  upcast instead); the dropout mask is stored as a bool tensor (1 byte/element, where peft
  keeps the dropped activations in the adapter dtype).
* ``reference``: float64 math (:func:`llmopt_ext.ops.reference.lora_linear`).

``lora_merge_`` / ``lora_unmerge_``: ``W +/- s B A`` accumulated in float32 and rounded once
into W's dtype, in place, blocked over rows (no W-sized temporary).
"""
from __future__ import annotations

import torch

from .. import backend
from . import reference
from ._lora_checks import check_linear, check_merge

Scalar = float | torch.Tensor

backend.register_op("lora_linear", ("triton", "cpu", "reference"))
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
# lora_linear, CPU path: composed ATen calls

# Rows per block when a bf16/fp16 operand meets fp32 adapters: the block is upcast to
# fp32 (2^20 elements = 4 MiB, e.g. 256 tokens of 4096 features) instead of the whole x.
_UPCAST_BLOCK_ELEMS = 1 << 20


def _row_blocks(m: int, width: int):
    step = max(1, _UPCAST_BLOCK_ELEMS // max(1, width))
    return range(0, m, step), step


def _mm_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, R) in b's dtype. When a is bf16/fp16 and b is fp32, rows of a are
    upcast a block at a time: an fp32 result without an fp32 copy of a."""
    if a.dtype == b.dtype:
        return a @ b
    out = torch.empty((a.shape[0], b.shape[1]), dtype=b.dtype, device=a.device)
    starts, step = _row_blocks(a.shape[0], a.shape[1])
    for i in starts:
        out[i : i + step] = a[i : i + step].to(b.dtype) @ b
    return out


def _mm_reduce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T (K, M) @ b (M, R) in b's dtype, blocks of rows of a upcast as in _mm_rows."""
    if a.dtype == b.dtype:
        return a.t() @ b
    out = torch.zeros((a.shape[1], b.shape[1]), dtype=b.dtype, device=a.device)
    starts, step = _row_blocks(a.shape[0], a.shape[1])
    for i in starts:
        out.addmm_(a[i : i + step].to(b.dtype).t(), b[i : i + step])
    return out


def _scale(t: torch.Tensor, scaling: Scalar) -> torch.Tensor:
    # The scale multiplies the (tokens x r) intermediate, never the (tokens x out) output.
    if isinstance(scaling, torch.Tensor):
        return t * scaling.reshape(()).to(device=t.device, dtype=t.dtype)
    return t * float(scaling)


class _LoraLinearAten(torch.autograd.Function):
    """CPU path. Saves x (a reference, as the base layer's own backward would), the
    (tokens x r) intermediate and, with dropout, a bool mask; never an upcast copy of x."""

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out):
        wt = weight if fan_in_fan_out else weight.t()  # (in, out) view
        y = torch.addmm(bias, x2, wt) if bias is not None else x2 @ wt
        mask = None
        xd = x2
        if dropout_p > 0.0 and training:
            mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
            xd = x2 * mask * (1.0 / (1.0 - dropout_p))
        t = _mm_rows(xd, lora_A.t())  # (tokens, r), adapter dtype
        ts = _scale(t, scaling)
        # base + s * t B^T in the output dtype: the add is fused into the GEMM (beta = 1).
        y.addmm_(ts.to(y.dtype), lora_B.t().to(y.dtype))
        ctx.save_for_backward(x2, weight, lora_A, lora_B, ts, mask)
        # Under torch.autocast the GEMMs above ran in the autocast dtype, so dy arrives in it;
        # backward re-enters the same autocast state (autograd runs backward outside it).
        dev = x2.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        dev, enabled, dtype = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            return _LoraLinearAten._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x2, weight, lora_A, lora_B, ts, mask = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        dy = dy.contiguous()
        need_x, _, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        gb = _scale(_mm_rows(dy, lora_B), s)  # s * dY B: (tokens, r), adapter dtype
        dx = da = db = dbias = None
        xd = x2
        if mask is not None:
            xd = x2 * mask * (1.0 / (1.0 - p))
        if need_x:
            w = weight.t() if ctx.fan_in_fan_out else weight  # (out, in)
            dx = dy @ w
            if mask is None:
                dx.addmm_(gb.to(dx.dtype), lora_A.to(dx.dtype))
            else:  # the adapter branch saw dropout(x): its gradient goes through the mask
                dx.add_((gb.to(dx.dtype) @ lora_A.to(dx.dtype)) * mask, alpha=1.0 / (1.0 - p))
        if need_a:
            da = _mm_reduce(xd, gb).t()  # (r, in) = (s dY B)^T dropout(x)
            da = da.to(lora_A.dtype)
        if need_bb:
            db = _mm_reduce(dy, ts).to(lora_B.dtype)  # (out, r) = dY^T (s t)
        if need_b and ctx.has_bias:
            dbias = dy.sum(0)
        return dx, None, dbias, da, db, None, None, None, None


def _lora_linear_aten(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out):
    x2 = x.reshape(-1, x.shape[-1])
    y = _LoraLinearAten.apply(x2, weight, bias, lora_A, lora_B, scaling, float(dropout_p), bool(training),
                              bool(fan_in_fan_out))
    return y.reshape(*x.shape[:-1], y.shape[-1])


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
    check_linear(op, x, weight, bias, lora_A, lora_B, scaling, dropout_p, fan_in_fan_out)
    chosen = backend.select(op, x.device)
    if chosen == "reference":
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training,
                                     fan_in_fan_out)
    if chosen == "triton":
        from .triton import lora as triton_lora  # noqa: PLC0415 - imports triton

        return triton_lora.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training,
                                       fan_in_fan_out)
    return _lora_linear_aten(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, fan_in_fan_out)
