"""Triton kernels of the fused LoRA Linear (backend ``triton`` of ``lora_linear``).

Forward, two launches:
  1. ``_lora_down_kernel``: ``t = dropout(x) A^T`` (tokens x r, float32), the only extra
     read of x.
  2. ``_lora_linear_fwd_kernel``: ``y = x W^T + s * t B^T + bias``; the low-rank product,
     the scale and the add run in the epilogue of the base GEMM tile, on the float32
     accumulator, and y is rounded once.
Backward, four launches:
  1. ``_lora_down_kernel``: ``g = dY B`` (tokens x r, float32).
  2. ``_lora_linear_fwd_kernel`` again: ``dX = dY W + s * (g A) * mask/(1-p)`` in one pass.
  3. ``_lora_grad_kernel``: ``dA = s g^T dropout(x)`` and 4. ``dB^T = s t^T dY``.

Dropout: the mask is never stored. It is regenerated from a Philox seed (one int64 drawn
from torch's default generator per call, so ``torch.manual_seed`` governs it) and the
element's flat index ``m * in_features + k``: two ``tl.rand`` calls per element instead of
a tokens x in_features mask in memory (bytes are the scarce resource; the RNG is ALU work).

The ops are ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd``
(``triton_op``/``wrap_triton`` broke fake tensors under ``TRITON_INTERPRET=1`` with
triton 3.9), so ``torch.compile`` traces the layer without graph breaks. The fake is
:func:`llmopt_ext.ops.lora.fused_forward_fake`, shared with the CPU op.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): triton 3.9's interpreted ``tl.dot`` on
bf16 operands multiplies raw bits, so every dot operand is cast to float32 when
``DOT_F32`` is set (it is, exactly when interpreting). bf16 accuracy of the compiled
kernels is only checked on a GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import lora as _lora

_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the operands' storage dtypes differ (bf16 activations, fp32 adapters): the
    # dot runs in fp32 ("ieee", as cuBLAS does with allow_tf32 off, peft's default).
    if DOT_F32 or UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _keep(seed_ptr, offs, p_drop):
    seed = tl.load(seed_ptr)
    return tl.rand(seed, offs) >= p_drop


@triton.jit
def _lora_down_kernel(
    x_ptr, q_ptr, out_ptr, seed_ptr, M, K, R,
    sxm, sxk, sqk, sqr, som, sor, p_drop,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[M, R] (float32) = dropout(X)[M, K] @ Q[K, R]."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xm = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=xm, other=0.0)
        if DROPOUT:
            keep = _keep(seed_ptr, rm[:, None] * K + rk[None, :], p_drop)
            x = tl.where(keep, x.to(tl.float32) * (1.0 / (1.0 - p_drop)), 0.0).to(x.dtype)
        q = tl.load(q_ptr + rk[:, None] * sqk + rr[None, :] * sqr,
                    mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)
        acc += _dot(x, q, DOT_F32, UPCAST)
    tl.store(out_ptr + rm[:, None] * som + rr[None, :] * sor, acc,
             mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _lora_linear_fwd_kernel(
    a_ptr, w_ptr, t_ptr, u_ptr, bias_ptr, y_ptr, scale_ptr, seed_ptr, scaling,
    M, N, K, R,
    sam, sak, swk, swn, stm, str_, sur, sun, sym, syn, p_drop,
    HAS_BIAS: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, MASK_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, UPCAST_LORA: tl.constexpr,
):
    """Y[M, N] = A[M, K] @ Wm[K, N] + s * (T[M, R] @ U[R, N]) (* mask[m, n] / (1 - p)) + bias.

    Forward: A = x, Wm = W^T, T = t, U = B^T. Backward dX: A = dY, Wm = W, T = dY B, U = A,
    MASK_LORA (the adapter saw dropout(x); mask offsets m * N + n match the forward's)."""
    pid = tl.program_id(0)
    # grouped ordering: GROUP_M row tiles share the W columns they stream (L2 reuse)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    gid = pid // group
    first_m = gid * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * sam + rk[None, :] * sak,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += _dot(a, w, DOT_F32, False)
    # epilogue: the rank-r update on the fp32 accumulator
    rr = tl.arange(0, BLOCK_R)
    t = tl.load(t_ptr + rm[:, None] * stm + rr[None, :] * str_,
                mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    u = tl.load(u_ptr + rr[:, None] * sur + rn[None, :] * sun,
                mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
    if SCALE_FROM_PTR:
        s = tl.load(scale_ptr)
    else:
        s = scaling
    if UPCAST_LORA:
        low = _dot(t, u, DOT_F32, True)
    else:  # adapters in the activations' dtype: t rounded to it, like peft's bf16 adapters
        low = _dot(t.to(u.dtype), u, DOT_F32, False)
    low = low * s
    if MASK_LORA:
        keep = _keep(seed_ptr, rm[:, None] * N + rn[None, :], p_drop)
        low = tl.where(keep, low * (1.0 / (1.0 - p_drop)), 0.0)
    acc += low
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _lora_grad_kernel(
    g_ptr, x_ptr, out_ptr, scale_ptr, seed_ptr, scaling, M, K, R,
    sgm, sgr, sxm, sxk, sor, sok, p_drop,
    DROPOUT: tl.constexpr, SCALE_FROM_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_F32: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[R, K] = s * G[M, R]^T @ dropout(X)[M, K] (reduction over the tokens)."""
    pid = tl.program_id(0)
    rk = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        g = tl.load(g_ptr + rm[:, None] * sgm + rr[None, :] * sgr,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        xm = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=xm, other=0.0)
        if DROPOUT:
            keep = _keep(seed_ptr, rm[:, None] * K + rk[None, :], p_drop)
            x = tl.where(keep, x.to(tl.float32) * (1.0 / (1.0 - p_drop)), 0.0).to(x.dtype)
        if UPCAST:
            acc += _dot(tl.trans(g), x, DOT_F32, True)
        else:
            acc += _dot(tl.trans(g.to(x.dtype)), x, DOT_F32, False)
    if SCALE_FROM_PTR:
        s = tl.load(scale_ptr)
    else:
        s = scaling
    acc = acc * s
    tl.store(out_ptr + rr[:, None] * sor + rk[None, :] * sok, acc.to(out_ptr.dtype.element_ty),
             mask=(rr[:, None] < R) & (rk[None, :] < K))


# ---------------------------------------------------------------------------
# launch configuration

def _blocks(interpret: bool):
    # GPU: 128x128x32 tiles, 8 warps, 3 stages (a standard bf16 GEMM shape for sm_80/sm_90;
    # not autotuned: untimed here, no GPU was lent). Interpreter: small tiles, the
    # interpreter's cost grows with the tile count far less than with tile area.
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4), dict()
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), dict(num_warps=8, num_stages=3)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dim >= 16


def _interpreting(t: torch.Tensor) -> bool:
    return _INTERPRET or t.device.type == "cpu"


def _scale_args(scaling: Optional[torch.Tensor], scaling_f: float, dummy: torch.Tensor):
    if scaling is not None:
        return scaling, 0.0, True
    return dummy, scaling_f, False


def _down(x, q, seed, p_drop, dropout, out_rows_dtype=torch.float32):
    """x (M, K) @ q (K, R) -> (M, R) float32, dropout on x when `dropout`."""
    M, K = x.shape
    R = q.shape[1]
    out = torch.empty((M, R), dtype=out_rows_dtype, device=x.device)
    interp = _interpreting(x)
    blk, kw = _blocks(interp)
    bm = blk["BLOCK_M"] if interp else 64
    grid = (triton.cdiv(M, bm),)
    _lora_down_kernel[grid](
        x, q, out, seed if seed is not None else out, M, K, R,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1), p_drop,
        DROPOUT=dropout, BLOCK_M=bm, BLOCK_K=blk["BLOCK_K"] if interp else 64, BLOCK_R=_block_r(R),
        DOT_F32=interp, UPCAST=x.dtype != q.dtype, **kw,
    )
    return out


def _gemm_lowrank(a, wm, t, u, bias, out, scaling, scaling_f, seed, p_drop, mask_lora):
    M, K = a.shape
    N = wm.shape[1]
    R = t.shape[1]
    interp = _interpreting(a)
    blk, kw = _blocks(interp)
    s_t, s_f, s_ptr = _scale_args(scaling, scaling_f, t)
    grid = (triton.cdiv(M, blk["BLOCK_M"]) * triton.cdiv(N, blk["BLOCK_N"]),)
    _lora_linear_fwd_kernel[grid](
        a, wm, t, u, bias if bias is not None else out, out, s_t, seed if seed is not None else out, s_f,
        M, N, K, R,
        a.stride(0), a.stride(1), wm.stride(0), wm.stride(1), t.stride(0), t.stride(1),
        u.stride(0), u.stride(1), out.stride(0), out.stride(1), p_drop,
        HAS_BIAS=bias is not None, SCALE_FROM_PTR=s_ptr, MASK_LORA=mask_lora, BLOCK_R=_block_r(R),
        DOT_F32=interp, UPCAST_LORA=u.dtype == torch.float32 and a.dtype != torch.float32, **blk, **kw,
    )
    return out


def _grad(g, x, out, scaling, scaling_f, seed, p_drop, dropout):
    """out (R, K) view = s * g^T dropout(x)."""
    M, K = x.shape
    R = g.shape[1]
    interp = _interpreting(x)
    blk, kw = _blocks(interp)
    bk = blk["BLOCK_K"] if interp else 64
    s_t, s_f, s_ptr = _scale_args(scaling, scaling_f, g)
    grid = (triton.cdiv(K, bk),)
    _lora_grad_kernel[grid](
        g, x, out, s_t, seed if seed is not None else g, s_f, M, K, R,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1), p_drop,
        DROPOUT=dropout, SCALE_FROM_PTR=s_ptr, BLOCK_M=blk["BLOCK_M"] if interp else 64, BLOCK_K=bk,
        BLOCK_R=_block_r(R), DOT_F32=interp, UPCAST=x.dtype != torch.float32 and out.dtype == torch.float32,
        **kw,
    )
    return out


# ---------------------------------------------------------------------------
# custom ops

@torch.library.custom_op("llmopt_ext::lora_linear_triton_fwd", mutates_args=())
def lora_linear_triton_fwd(
    x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: Optional[torch.Tensor], scaling_f: float, seed: Optional[torch.Tensor],
    dropout_p: float, fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, t): y = x2 W^T + bias + s t B^T and t = dropout(x2) A^T (float32, saved for backward)."""
    dropout = seed is not None
    t = _down(x2, lora_A.t(), seed, dropout_p, dropout)
    wm = weight if fan_in_fan_out else weight.t()  # (in, out)
    y = torch.empty((x2.shape[0], wm.shape[1]), dtype=x2.dtype, device=x2.device)
    _gemm_lowrank(x2, wm, t, lora_B.t(), bias, y, scaling, scaling_f, None, 0.0, False)
    return y, t


lora_linear_triton_fwd.register_fake(_lora.fused_forward_fake)  # one fake for both backends


@torch.library.custom_op("llmopt_ext::lora_linear_triton_bwd", mutates_args=())
def lora_linear_triton_bwd(
    dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    t: torch.Tensor, scaling: Optional[torch.Tensor], scaling_f: float, seed: Optional[torch.Tensor],
    dropout_p: float, fan_in_fan_out: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB) of lora_linear_triton_fwd."""
    dropout = seed is not None
    g = _down(dy, lora_B, None, 0.0, False)  # dY B (tokens, r), float32
    w = weight.t() if fan_in_fan_out else weight  # (out, in)
    dx = torch.empty_like(x2)
    _gemm_lowrank(dy, w, g, lora_A, None, dx, scaling, scaling_f, seed, dropout_p, dropout)
    da = torch.empty_like(lora_A)
    _grad(g, x2, da, scaling, scaling_f, seed, dropout_p, dropout)
    db = torch.empty_like(lora_B)
    _grad(t, dy, db.t(), scaling, scaling_f, None, 0.0, False)
    return dx, da, db


@lora_linear_triton_bwd.register_fake
def _(dy, x2, weight, lora_A, lora_B, t, scaling, scaling_f, seed, dropout_p, fan_in_fan_out):
    return torch.empty_like(x2), torch.empty_like(lora_A), torch.empty_like(lora_B)


def _setup_context(ctx, inputs, output):
    x2, weight, bias, lora_A, lora_B, scaling, scaling_f, seed, dropout_p, fan_in_fan_out = inputs
    _, t = output
    ctx.save_for_backward(x2, weight, lora_A, lora_B, t, scaling, seed)
    ctx.scaling_f, ctx.dropout_p, ctx.fan_in_fan_out = scaling_f, dropout_p, fan_in_fan_out
    ctx.has_bias = bias is not None


def _backward(ctx, dy, dt):
    x2, weight, lora_A, lora_B, t, scaling, seed = ctx.saved_tensors
    dx, da, db = lora_linear_triton_bwd(dy.contiguous(), x2, weight, lora_A, lora_B, t, scaling,
                                        ctx.scaling_f, seed, ctx.dropout_p, ctx.fan_in_fan_out)
    dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, None, dbias, da, db, None, None, None, None, None


lora_linear_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False, fan_in_fan_out=False):
    """Arguments as llmopt_ext.ops.lora_linear (already checked there)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    s_t, s_f, seed = _lora.fused_scalars(scaling, dropout_p, training, x.device)
    y, _ = lora_linear_triton_fwd(x2, weight, bias, lora_A, lora_B, s_t, s_f, seed, float(dropout_p),
                                  bool(fan_in_fan_out))
    return y.reshape(*x.shape[:-1], y.shape[-1])
