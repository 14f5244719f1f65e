"""Fused optimizer updates (sophia_update_, adahessian_update_) vs a per-tensor PyTorch loop
(the style of the official Sophia / AdaHessian code and torch-optimizer), torch._foreach_*
(pytorch-optimizer's foreach path), and the pure-PyTorch reference; torch.optim.AdamW
(fused=True) is the speed bar per byte of memory touched. LoRA-like lists (16x4096 and
4096x16 tensors) and, on GPU, one large list (>= 100M elements). Memory-bound: GB/s from
explicit byte counts against the measured copy bandwidth.

    python -m bench.bench_optim_update [--quick] [--device cuda]
"""
from __future__ import annotations


import torch

from llmopt_ext import backend, ops
from llmopt_ext.ops import reference

from . import harness
from .harness import Results, copy_bandwidth, measure

LR, B1, B2, RHO, WD, EPS = 1e-4, 0.965, 0.99, 0.04, 0.1, 1e-12
GOAL_PER_BYTE_VS_ADAMW = 0.9  # the performance issue: >= 0.9x fused AdamW's GB/s in every dtype


def lora_shapes(n: int, rank: int = 16, dim: int = 4096) -> list[tuple[int, int]]:
    return [(rank, dim) if i % 2 == 0 else (dim, rank) for i in range(n)]


def make(shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda s: torch.randn(s, generator=g, device=device)  # noqa: E731
    return dict(p=[r(s).to(dtype) for s in shapes], g=[r(s).to(dtype) * 1e-3 for s in shapes],
                m=[torch.zeros(s, device=device) for s in shapes],
                v=[torch.zeros(s, device=device) for s in shapes],
                h=[r(s).abs() for s in shapes])


# ---- baselines --------------------------------------------------------------

def sophia_loop(L):
    """Official SophiaG step, one op sequence per tensor (fp32 state, params cast per op)."""
    for p, g, m, h in zip(L["p"], L["g"], L["m"], L["h"]):
        p.mul_(1 - LR * WD)
        m.mul_(B1).add_(g.float(), alpha=1 - B1)
        ratio = (m.abs() / (RHO * h + 1e-15)).clamp(None, 1)
        p.add_((m.sign() * ratio).to(p.dtype), alpha=-LR)


def sophia_foreach(L):
    torch._foreach_mul_(L["p"], 1 - LR * WD)
    gs = [g.float() for g in L["g"]] if L["g"][0].dtype != torch.float32 else L["g"]
    torch._foreach_lerp_(L["m"], gs, 1 - B1)
    den = torch._foreach_mul(L["h"], RHO)
    torch._foreach_add_(den, 1e-15)
    ratio = torch._foreach_div(torch._foreach_abs(L["m"]), den)
    torch._foreach_clamp_max_(ratio, 1.0)
    torch._foreach_mul_(ratio, torch._foreach_sign(L["m"]))
    if L["p"][0].dtype != torch.float32:
        ratio = [r.to(L["p"][0].dtype) for r in ratio]
    torch._foreach_add_(L["p"], ratio, alpha=-LR)


def ada_loop(L, step=10):
    bc1, bc2 = 1 - B1**step, 1 - B2**step
    for p, g, m, v, d in zip(L["p"], L["g"], L["m"], L["v"], L["h"]):
        m.mul_(B1).add_(g.float(), alpha=1 - B1)
        v.mul_(B2).addcmul_(d, d, value=1 - B2)
        den = (v / bc2).sqrt_().add_(EPS)
        p.mul_(1 - LR * WD)
        p.add_((m / den).to(p.dtype), alpha=-LR / bc1)


def ada_foreach(L, step=10):
    bc1, bc2 = 1 - B1**step, 1 - B2**step
    gs = [g.float() for g in L["g"]] if L["g"][0].dtype != torch.float32 else L["g"]
    torch._foreach_lerp_(L["m"], gs, 1 - B1)
    torch._foreach_mul_(L["v"], B2)
    torch._foreach_addcmul_(L["v"], L["h"], L["h"], value=1 - B2)
    den = torch._foreach_div(L["v"], bc2)
    torch._foreach_sqrt_(den)
    torch._foreach_add_(den, EPS)
    torch._foreach_mul_(L["p"], 1 - LR * WD)
    upd = torch._foreach_div(L["m"], den)
    if L["p"][0].dtype != torch.float32:
        upd = [u.to(L["p"][0].dtype) for u in upd]
    torch._foreach_add_(L["p"], upd, alpha=-LR / bc1)


def fused(op, L, b):
    with backend.use(b):
        if op == "sophia":
            ops.sophia_update_(L["p"], L["g"], L["m"], L["h"], lr=LR, beta1=B1, rho=RHO, weight_decay=WD)
        else:
            ops.adahessian_update_(L["p"], L["g"], L["m"], L["v"], L["h"], step=10, lr=LR, beta1=B1,
                                   beta2=B2, weight_decay=WD, eps=EPS)


def adamw_fused(shapes, dtype, device):
    ps = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(ps, lr=LR, fused=True)
    opt.step()  # state allocated
    return opt.step


def run(device: torch.device, quick: bool) -> list[Results]:
    res = Results("bench_optim_update", device, title="Fused Sophia / AdaHessian updates",
                  key=["op", "list", "dtype"])
    bw = copy_bandwidth(device, nbytes=(64 << 20) if quick else (256 << 20))
    ours = "cuda" if device.type == "cuda" else "cpu"
    res.notes += [f"copy bandwidth {bw:.1f} GB/s (read + write)",
                  "bytes/elem: sophia 3*param + 12 (m r/w, h); adahessian 3*param + 20 (m, v r/w, d); "
                  "AdamW(fused) 3*param + 4*state",
                  "loop: one op sequence per tensor (official code style); foreach: torch._foreach_* "
                  "(pytorch-optimizer); vs_*: their time / fused time",
                  "meets_goal1: no slower than the better of loop and foreach; meets_per_byte: per_byte_vs_adamw "
                  f">= {GOAL_PER_BYTE_VS_ADAMW}"]
    sizes = [32] if quick else [128, 512]
    cases = [(f"lora x{n}", lora_shapes(n)) for n in sizes]
    if device.type == "cuda" and not quick:
        cases.append(("large 4x32M", [(32 << 20,)] * 4))
    for label, shapes in cases:
        numel = sum(a * (b if len(s) > 1 else 1) for s in shapes for a, b in [(s[0], s[1] if len(s) > 1 else 1)])
        for dtype in (torch.float32, torch.bfloat16):
            esz = torch.tensor([], dtype=dtype).element_size()
            adam_step = adamw_fused(shapes, dtype, device)
            t_adam = measure(adam_step, device, max_reps=10 if quick else 30)["ms"]
            adam_bytes = numel * (3 * esz + 4 * esz)
            for op in ("sophia", "adahessian"):
                L = make(shapes, dtype, device)
                loop = sophia_loop if op == "sophia" else ada_loop
                fe = sophia_foreach if op == "sophia" else ada_foreach
                ref_args = (lambda: reference.sophia_update_(L["p"], L["g"], L["m"], L["h"], LR, B1, RHO, WD, EPS)) \
                    if op == "sophia" else (lambda: reference.adahessian_update_(
                        L["p"], L["g"], L["m"], L["v"], L["h"], torch.tensor(10.0), LR, B1, B2, WD, EPS, 1.0))
                reps = 10 if quick else 30
                t = {
                    "fused": measure(lambda: fused(op, L, ours), device, max_reps=reps)["ms"],
                    "loop": measure(lambda: loop(L), device, max_reps=reps)["ms"],
                    "foreach": measure(lambda: fe(L), device, max_reps=reps)["ms"],
                    "reference": measure(ref_args, device, max_reps=3 if quick else 10, min_time_s=0.1)["ms"],
                }
                nbytes = numel * (3 * esz + (12 if op == "sophia" else 20))
                gbs = nbytes / (t["fused"] * 1e-3) / 1e9
                adam_gbs = adam_bytes / (t_adam * 1e-3) / 1e9
                res.add(op=op, list=label, dtype=str(dtype).replace("torch.", ""), elements=numel,
                        fused_ms=t["fused"], GBps=gbs, pct_copy_bw=100 * gbs / bw,
                        loop_ms=t["loop"], foreach_ms=t["foreach"], reference_ms=t["reference"],
                        vs_loop=t["loop"] / t["fused"], vs_foreach=t["foreach"] / t["fused"],
                        vs_reference=t["reference"] / t["fused"], adamw_fused_ms=t_adam,
                        adamw_GBps=adam_gbs, per_byte_vs_adamw=gbs / adam_gbs,
                        meets_goal1=t["fused"] <= min(t["loop"], t["foreach"]),
                        meets_per_byte=gbs / adam_gbs >= GOAL_PER_BYTE_VS_ADAMW)
    res.plot(["vs_loop", "vs_foreach", "vs_reference"], label=["op", "list", "dtype"],
             title="Fused Sophia / AdaHessian updates: speed-up over PyTorch baselines")
    res.plot(["GBps", "adamw_GBps"], label=["op", "list", "dtype"], kind="value", limits=harness.bandwidth_limits(device),
             xlabel="GB/s", title="Fused updates vs torch AdamW(fused=True): achieved bandwidth")
    return [res]


if __name__ == "__main__":
    harness.main(run, __doc__)
