"""Random Stiefel projectors: llmopt_ext's random_stiefel / orthonormalize / philox_normal_
against torch.linalg.qr of a Gaussian (what the GoLore and most random-projection code does),
the same CholeskyQR2 composed from float32 ATen calls (mm + cholesky + solve_triangular), the
float64 reference, and GaLore's projector refresh (a full SVD of the gradient). Also one
GoLoreAdamW step against galore-torch's GaLoreAdamW (when importable).

Compute-bound: GFLOP/s of CholeskyQR2 counted as 4 m r^2 (two passes of a Gram matrix and a
triangular solve, m r^2 each).

    python -m bench.bench_stiefel [--quick] [--device cuda]
"""
from __future__ import annotations

import torch

from llmopt_ext import backend, ops
from llmopt_ext.ops import reference
from llmopt_ext.optim import GoLoreAdamW

from . import harness
from .baselines import galore_torch
from .harness import Results, measure


def aten_cholqr2(x: torch.Tensor) -> torch.Tensor:
    """CholeskyQR2 in x's dtype from ATen calls (the strongest plain-PyTorch CholeskyQR)."""
    for _ in range(2):
        lower = torch.linalg.cholesky(x.mT @ x)
        x = torch.linalg.solve_triangular(lower.mT, x, upper=True, left=False)
    return x


def qr_of_randn(m: int, r: int, device) -> torch.Tensor:
    q, rr = torch.linalg.qr(torch.randn(m, r, device=device))
    return q * torch.sign(rr.diagonal())  # the Haar sign correction


def galore_adamw_class():
    return galore_torch("adamw", "AdamW")


def run(device: torch.device, quick: bool = False) -> list[Results]:
    ours_backend = "cuda" if device.type == "cuda" else "cpu"
    res = Results("stiefel", device, title="Random Stiefel projectors (random_stiefel, orthonormalize)",
                  key=["op", "m", "r"])
    res.notes.append("vs_X = time of X / time of llmopt_ext, same run. qr_randn = torch.linalg.qr("
                     "torch.randn) with the sign fix; aten_cholqr2 = float32 CholeskyQR2 from ATen calls; "
                     "reference = float64 CholeskyQR2 (llmopt_ext.ops.reference)")
    res.notes.append("meets_goal1: the default path is no slower than the best plain-PyTorch baseline in the "
                     "row (torch.randn; linalg.qr / aten_cholqr2; qr_randn / aten_cholqr2 of randn)")
    res.notes.append("llmopt_ext default (exact=False): float32 CholeskyQR2 from ATen calls (each pass a GEMM "
                     "by the inverse of the r x r Cholesky factor) with one host sync (hand-over check); "
                     "exact_ms = exact=True: CPU float64 CholeskyQR2 in C++ (OpenMP, fixed summation order, "
                     "AVX2/AVX-512 clones), CUDA float32 CholeskyQR2 from cuBLAS/cuSOLVER calls")
    shapes = [(1024, 64), (4096, 128)] if quick else [(4096, 128), (4096, 256), (14336, 128)]
    reps = dict(max_reps=5 if quick else 20)
    with torch.no_grad():
        for m, r in shapes:
            x = torch.randn(m, r, device=device)
            out = torch.empty(m, r, device=device)
            flops = 4 * m * r * r
            with backend.use(ours_backend):
                t_gen = measure(lambda: ops.philox_normal_(out, 1, 0), device, **reps)["ms"]
                t_ortho = measure(lambda: ops.orthonormalize(x), device, **reps)["ms"]
                t_exact = measure(lambda: ops.orthonormalize(x, exact=True), device, **reps)["ms"]
                t_stiefel = measure(lambda: ops.random_stiefel(m, r, seed=1, device=device), device, **reps)["ms"]
            t_randn = measure(lambda: torch.randn(m, r, device=device), device, **reps)["ms"]
            t_qr = measure(lambda: torch.linalg.qr(x), device, **reps)["ms"]
            t_qr_randn = measure(lambda: qr_of_randn(m, r, device), device, **reps)["ms"]
            t_aten = measure(lambda: aten_cholqr2(x), device, **reps)["ms"]
            t_aten_full = measure(lambda: aten_cholqr2(torch.randn(m, r, device=device)), device, **reps)["ms"]
            with backend.use("reference"):
                t_ref = measure(lambda: ops.orthonormalize(x, exact=True), device, max_reps=3)["ms"]
            res.add(op="philox_normal_", m=m, r=r, llmopt_ms=t_gen, torch_randn_ms=t_randn, vs_randn=t_randn / t_gen,
                    meets_goal1=t_gen <= t_randn)
            res.add(op="orthonormalize", m=m, r=r, llmopt_ms=t_ortho, GFLOPs=flops / t_ortho / 1e6,
                    exact_ms=t_exact, exact_vs_reference=t_ref / t_exact,
                    linalg_qr_ms=t_qr, aten_cholqr2_ms=t_aten, reference_ms=t_ref,
                    vs_linalg_qr=t_qr / t_ortho, vs_aten_cholqr2=t_aten / t_ortho, vs_reference=t_ref / t_ortho,
                    meets_goal1=t_ortho <= min(t_qr, t_aten))
            res.add(op="random_stiefel", m=m, r=r, llmopt_ms=t_stiefel, qr_randn_ms=t_qr_randn,
                    aten_cholqr2_ms=t_aten_full, vs_qr_randn=t_qr_randn / t_stiefel,
                    vs_aten_cholqr2=t_aten_full / t_stiefel, meets_goal1=t_stiefel <= min(t_qr_randn, t_aten_full))

        # Projector refresh: GaLore's SVD of the full gradient vs a random Stiefel basis.
        n = 1024 if quick else 4096
        g = torch.randn(n, n, device=device)
        t_svd = measure(lambda: torch.linalg.svd(g, full_matrices=False), device, warmup=0, min_reps=1,
                        max_reps=1 if n >= 4096 else 3)["ms"]
        with backend.use(ours_backend):
            t_rand = measure(lambda: ops.random_stiefel(n, 128, seed=2, device=device), device, **reps)["ms"]
        res.add(op="projector_refresh", m=n, r=128, llmopt_ms=t_rand, galore_svd_ms=t_svd, vs_galore_svd=t_svd / t_rand)

    # One optimizer step (no refresh) on an n x n weight, rank 128.
    n = 512 if quick else 2048
    GaLoreAdamW = galore_adamw_class()
    w1 = torch.nn.Parameter(torch.randn(n, n, device=device))
    grad = torch.randn(n, n, device=device)
    ours = GoLoreAdamW([w1], lr=1e-3, rank=128, update_proj_gap=10**9, scale=0.25, rand_ratio=0.0, seed=0)
    w1.grad = grad
    ours.step()  # the first step builds the projector
    t_ours = measure(ours.step, device, **reps)["ms"]
    row = dict(op="optimizer_step", m=n, r=128, llmopt_ms=t_ours)
    if GaLoreAdamW is not None:
        w2 = torch.nn.Parameter(torch.randn(n, n, device=device))
        theirs = GaLoreAdamW([{"params": [w2], "rank": 128, "update_proj_gap": 10**9, "scale": 0.25,
                               "proj_type": "std"}], lr=1e-3, no_deprecation_warning=True)
        w2.grad = grad
        theirs.step()
        t_theirs = measure(theirs.step, device, **reps)["ms"]
        row.update(galore_adamw_ms=t_theirs, vs_galore_adamw=t_theirs / t_ours)
    else:
        res.notes.append("galore-torch not importable: no GaLoreAdamW comparison")
    res.add(**row)
    res.plot(["vs_randn", "vs_linalg_qr", "vs_aten_cholqr2", "vs_qr_randn", "vs_galore_svd", "vs_galore_adamw"],
             label=["op", "m", "r"], title="Stiefel projectors: speed-up over PyTorch / GaLore baselines")
    return [res]


if __name__ == "__main__":
    harness.main(run, __doc__)
