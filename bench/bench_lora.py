"""Fused LoRA Linear vs the frozen base Linear alone and peft's lora.Linear, and LoRA merge
bandwidth.

Linear: forward, backward (fwd+bwd minus fwd), fwd+bwd, and the bytes autograd saves for
backward (counted with saved_tensors_hooks, parameters excluded; plus peak CUDA memory on
a GPU). Shapes are Llama-3-8B projections (4096->4096, 4096->1024, 4096->14336,
14336->4096), bf16 activations with fp32 adapters (peft's default autocast_adapter_dtype)
and bf16 adapters, without dropout, plus dropout p = 0.1 at the first shape (saved bytes: the
mask). On GPU: 2048 and 8192 tokens, r in {8, 16, 64}. On CPU the full run uses 256 and 2048
tokens and r = 16; --quick uses small shapes. Goal columns: meets_vs_base, meets_vs_peft,
saved_le_peft.

DoRA (``use_dora=True``): fwd+bwd of the fused DoRA layer vs peft's DoRA layer and the
fused plain LoRA layer at 4096->4096, r = 16 (CPU: 256 tokens, single thread; GPU: 2048),
without dropout and with p = 0.1; goal: fused DoRA <= 1.3x the fused LoRA layer's time,
and saved bytes <= peft's DoRA. Only these rows:
``python -m bench.bench_lora --dora [--dora-dtypes fp32,bf16]`` (activations' dtype;
adapters fp32, peft's default autocast_adapter_dtype; default both).

Merge: lora_merge_ GB/s (W read + written) against the measured copy bandwidth, and
against peft's merge (delta = B A materialised, rounded, then added) in the same run. Only
these rows: ``python -m bench.bench_lora --merge [--merge-dtypes bf16,fp32,fp16] [--quick]``
(W's dtype; default bf16,fp32 as in the full run).

    python -m bench.bench_lora [--quick] [--device cuda]
"""
from __future__ import annotations

import copy
import statistics

import torch
from peft import LoraConfig
from peft.tuners.lora import layer as peft_layer

from llmopt_ext import backend, ops
from llmopt_ext import nn as lnn
from llmopt_ext.ops import reference

from . import harness
from .harness import Results, copy_bandwidth, measure

LLAMA8B = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]


# Goals of the fused layer (fwd+bwd): at most 1.10x the frozen base layer (the FLOP floor
# is ~1.01-1.02x at r = 16), and at most half of peft's overhead over the base.
GOAL_VS_BASE = 1.10
GOAL_OVERHEAD_VS_PEFT = 0.5


def _layers(in_f, out_f, r, dtype, adt, device, dropout=0.0):
    base = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, init_lora_weights=False)
    plain = peft_layer.Linear(base, "default", config=cfg, r=r, lora_alpha=2 * r)
    plain.lora_A["default"].to(adt)
    plain.lora_B["default"].to(adt)
    fused = copy.deepcopy(plain)
    lnn.fuse_lora(fused)
    return base, plain, fused


def _saved_bytes(fn, module) -> int:
    """Bytes autograd keeps for backward (distinct storages; storages of the module's
    parameters, e.g. the transposed weight view F.linear saves, excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in params:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _configs(shapes, tokens_list, ranks, adapters=("fp32", "bf16")):
    """(adapters, shape, tokens, r, dropout): every shape without dropout, and p = 0.1 at the
    first shape and token count (the memory comparison: the mask is what differs)."""
    for adt_name in adapters:
        for in_f, out_f in shapes:
            for tokens in tokens_list:
                for r in ranks:
                    yield adt_name, (in_f, out_f), tokens, r, 0.0
        yield adt_name, shapes[0], tokens_list[0], ranks[0], 0.1


def _goal_columns(row):
    row["fused_vs_base_fwdbwd"] = row["fused_fwdbwd_ms"] / row["base_fwdbwd_ms"]
    row["peft_vs_base_fwdbwd"] = row["peft_fwdbwd_ms"] / row["base_fwdbwd_ms"]
    row["meets_vs_base"] = bool(row["fused_vs_base_fwdbwd"] <= GOAL_VS_BASE)
    peft_over = row["peft_fwdbwd_ms"] - row["base_fwdbwd_ms"]
    ours_over = row["fused_fwdbwd_ms"] - row["base_fwdbwd_ms"]
    row["overhead_vs_peft"] = ours_over / peft_over if peft_over > 0 else float("nan")
    row["meets_vs_peft"] = bool(ours_over <= GOAL_OVERHEAD_VS_PEFT * max(peft_over, 0.0))
    row["saved_le_peft"] = bool(row["fused_saved_MB"] <= row["peft_saved_MB"])
    row["meets_goal1"] = bool(row["fused_fwdbwd_ms"] <= row["peft_fwdbwd_ms"])


def _linear_rows(res, device, shapes, tokens_list, ranks, quick, act=torch.bfloat16):
    lin_backend = "triton" if device.type == "cuda" else "cpu"
    # at least 5 calls each: a 2048-token call takes 0.1-0.4 s, and 3 let one page-faulting
    # call decide a median
    reps = dict(max_reps=5 if quick else 10, min_reps=3 if quick else 5, min_time_s=0.1)
    adapters = ("fp32", "bf16") if act == torch.bfloat16 else ("fp32",)  # bf16 adapters need bf16 x
    for adt_name, (in_f, out_f), tokens, r, p in _configs(shapes, tokens_list, ranks, adapters):
        adt = torch.float32 if adt_name == "fp32" else torch.bfloat16
        torch.manual_seed(0)
        base, plain, fused = _layers(in_f, out_f, r, act, adt, device, p)
        plain.train(), fused.train()
        x = torch.randn(tokens, in_f, device=device, dtype=act, requires_grad=True)
        gy = torch.randn(tokens, out_f, device=device, dtype=act)
        impls = {"base": base, "peft": plain, "fused": fused}
        row = dict(shape=f"{in_f}->{out_f}", tokens=tokens, r=r, activations=str(act).replace("torch.", ""),
                   adapters=adt_name, dropout=p)
        for name, mod in impls.items():
            with backend.use(lin_backend if name == "fused" else None):
                def fwd(mod=mod):
                    return mod(x)

                def fwd_bwd(mod=mod):
                    mod(x).backward(gy)

                t_f = measure(fwd, device, **reps)["ms"]
                t_fb = measure(fwd_bwd, device, **reps)["ms"]
                row[f"{name}_fwd_ms"] = t_f
                row[f"{name}_bwd_ms"] = max(t_fb - t_f, 0.0)
                row[f"{name}_fwdbwd_ms"] = t_fb
                row[f"{name}_saved_MB"] = _saved_bytes(fwd, mod) / 2**20
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    fwd_bwd()
                    row[f"{name}_peak_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
            x.grad = None
        if quick and in_f * out_f <= 1 << 20:  # float64 reference: the spec, small shapes only
            a, b = fused.lora_A["default"].weight, fused.lora_B["default"].weight
            s = fused.scaling["default"]

            def ref_fb():
                reference.lora_linear(x, base.weight, None, a, b, s).backward(gy)

            row["reference_fwdbwd_ms"] = measure(ref_fb, device, **reps)["ms"]
            row["fused_vs_reference"] = row["reference_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
        _goal_columns(row)
        row["speedup_vs_peft_fwdbwd"] = row["peft_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
        row["speedup_vs_peft_fwd"] = row["peft_fwd_ms"] / row["fused_fwd_ms"]
        # fwd: base GEMM + x A^T + (xA^T) B^T; bwd: dX through W and the adapter, dA, dB
        flops = 4 * tokens * in_f * out_f + 6 * tokens * r * (in_f + out_f)
        row["fused_TFLOPs"] = flops / (row["fused_fwdbwd_ms"] * 1e-3) / 1e12
        row["pct_matmul"] = 100 * row["fused_TFLOPs"] / harness.matmul_throughput(device, act)
        res.add(**row)


GOAL_DORA_VS_LORA = 1.3


def _dora_layers(in_f, out_f, r, dtype, device, dropout):
    """(peft DoRA, fused DoRA, fused LoRA) over one frozen base, fp32 adapters, a drawn B and
    a magnitude moved off its initial norm (so the DoRA rescaling is not the identity)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=True, init_lora_weights=False)
    plain = peft_layer.Linear(base, "default", config=cfg, r=r, lora_alpha=2 * r, lora_dropout=dropout,
                              use_dora=True)
    with torch.no_grad():
        plain.lora_magnitude_vector["default"].weight.mul_(1.1)
    fused = copy.deepcopy(plain)
    lnn.fuse_lora(fused)
    lora = copy.deepcopy(fused)
    del lora.lora_variant["default"]  # the same adapter without DoRA: the fused LoRA path
    return plain.train(), fused.train(), lora.train()


def _dora_rows(res, device, tokens, dtypes, quick):
    """Rounds of one timed call per implementation, interleaved (a shared machine's load
    changes hit all three alike); the medians over the rounds."""
    lin_backend = "triton" if device.type == "cuda" else "cpu"
    rounds = 3 if quick else 7
    once = dict(min_reps=1, max_reps=1, min_time_s=0.0, warmup=0)
    in_f = out_f = 1024 if quick else 4096
    r = 16
    for dt_name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
        for p in (0.0, 0.1):
            plain, fused, lora = _dora_layers(in_f, out_f, r, dtype, device, p)
            x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
            gy = torch.randn(tokens, out_f, device=device, dtype=dtype)
            row = dict(shape=f"{in_f}->{out_f}", tokens=tokens, r=r, activations=dt_name, adapters="fp32",
                       dropout=p, rounds=rounds)
            lnn.reset_fallback_counts()
            impls = {"fused_lora": lora, "fused_dora": fused, "peft_dora": plain}
            fns = {}
            for name, mod in impls.items():
                def fwd(mod=mod):
                    return mod(x)

                def fwd_bwd(mod=mod):
                    mod(x).backward(gy)

                fns[name] = (fwd, fwd_bwd, lin_backend if name.startswith("fused") else None)
            times = {f"{n}_{k}": [] for n in impls for k in ("fwd", "fwdbwd")}
            for i in range(rounds + 1):  # round 0 warms up
                for name, (fwd, fwd_bwd, be) in fns.items():
                    with backend.use(be):
                        t_f = measure(fwd, device, **once)["ms"]
                        t_fb = measure(fwd_bwd, device, **once)["ms"]
                    if i:
                        times[f"{name}_fwd"].append(t_f)
                        times[f"{name}_fwdbwd"].append(t_fb)
                x.grad = None
            for key, ts in times.items():
                row[f"{key}_ms"] = statistics.median(ts)
            for name, (fwd, fwd_bwd, be) in fns.items():
                with backend.use(be):
                    row[f"{name}_saved_MB"] = _saved_bytes(fwd, impls[name]) / 2**20
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        fwd_bwd()
                        row[f"{name}_peak_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
                x.grad = None
            if lnn.fallback_counts():
                raise RuntimeError(f"bench_lora DoRA rows: fused layers fell back: {lnn.fallback_counts()}")
            row["dora_vs_lora_fwdbwd"] = row["fused_dora_fwdbwd_ms"] / row["fused_lora_fwdbwd_ms"]
            row["peft_dora_vs_fused_lora_fwdbwd"] = row["peft_dora_fwdbwd_ms"] / row["fused_lora_fwdbwd_ms"]
            row["speedup_vs_peft_dora_fwdbwd"] = row["peft_dora_fwdbwd_ms"] / row["fused_dora_fwdbwd_ms"]
            row["meets_dora_vs_lora"] = bool(row["dora_vs_lora_fwdbwd"] <= GOAL_DORA_VS_LORA)
            row["saved_le_peft_dora"] = bool(row["fused_dora_saved_MB"] <= row["peft_dora_saved_MB"])
            res.add(**row)


def run_dora(device: torch.device, quick: bool = False, dtypes=("bf16", "fp32")) -> list[Results]:
    """The DoRA rows alone (single-threaded on CPU; the thread count is restored after)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run_dora(device, quick, dtypes)
    finally:
        torch.set_num_threads(threads)


def _run_dora(device: torch.device, quick: bool, dtypes) -> list[Results]:
    dora = Results("lora_dora", device, title="Fused DoRA Linear vs peft's DoRA and the fused LoRA layer",
                   key=["shape", "tokens", "activations", "dropout"])
    dora.notes.append("times in ms: median over `rounds` rounds of one call per implementation, "
                      "interleaved; saved_MB = bytes autograd keeps for backward (parameters "
                      "excluded); adapters fp32; ratios from the same run")
    dora.notes.append(f"meets_dora_vs_lora: fused DoRA fwd+bwd <= {GOAL_DORA_VS_LORA}x the fused LoRA layer's "
                      "(the same adapter without DoRA); saved_le_peft_dora: fused DoRA saved_MB <= peft's DoRA")
    dora.notes.append("dropout > 0: peft's DoRA term runs its own base GEMM on dropout(x), and so does the "
                      "fused one (the same result needs it): two base GEMMs each way")
    _dora_rows(dora, device, 2048 if device.type == "cuda" else 256, dtypes, quick)
    dora.plot(["dora_vs_lora_fwdbwd", "peft_dora_vs_fused_lora_fwdbwd"],
              label=["shape", "tokens", "activations", "dropout"], kind="value",
              limits=[(GOAL_DORA_VS_LORA, "goal"), (1.0, "fused LoRA")],
              xlabel="fwd+bwd time / fused LoRA fwd+bwd time (lower is better)",
              title="DoRA: fused and peft's, against the fused LoRA layer")
    return [dora]


MERGE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# Merge goal (performance issue): >= 70 % of the measured copy bandwidth with float32 W,
# >= 50 % with 16-bit W, at r <= 64.
GOAL_MERGE_PCT_COPY = {torch.float32: 70.0, torch.bfloat16: 50.0, torch.float16: 50.0}


def _merge_rows(res, device, shapes, ranks, quick, dtypes=("bf16", "fp32")):
    bw = copy_bandwidth(device)
    res.notes.append(f"measured copy bandwidth: {bw:.1f} GB/s (read + write)")
    res.notes.append("meets_goal1: no slower than peft's merge; meets_bandwidth: pct_copy_bw >= "
                     + ", ".join(f"{v:.0f} ({str(k).replace('torch.', '')})" for k, v in GOAL_MERGE_PCT_COPY.items()))
    merge_backend = "cuda" if device.type == "cuda" else "cpu"
    for in_f, out_f in shapes:
        for r in ranks:
            for wdt in (MERGE_DTYPES[d] for d in dtypes):
                g = torch.Generator().manual_seed(0)
                w = torch.randn(out_f, in_f, generator=g).to(wdt).to(device)
                a = (torch.randn(r, in_f, generator=g) * 0.01).to(device)
                b = (torch.randn(out_f, r, generator=g) * 0.01).to(device)
                reps = dict(max_reps=5 if quick else 10, min_reps=3, min_time_s=0.1)

                def ours():
                    with backend.use(merge_backend):
                        ops.lora_merge_(w, a, b, 1e-3)

                def peft_merge():  # peft's Linear.merge: materialise B A * s, round, add
                    w.data += ((b @ a) * 1e-3).to(wdt)

                t = measure(ours, device, **reps)["ms"]
                t_peft = measure(peft_merge, device, **reps)["ms"]
                nbytes = 2 * w.numel() * w.element_size()
                gbs = nbytes / (t * 1e-3) / 1e9
                goal = GOAL_MERGE_PCT_COPY[wdt]
                res.add(shape=f"{in_f}->{out_f}", r=r, weight=str(wdt).replace("torch.", ""), merge_ms=t,
                        GBps=gbs, pct_copy_bw=100 * gbs / bw, peft_merge_ms=t_peft, speedup_vs_peft=t_peft / t,
                        meets_goal1=t <= t_peft, meets_bandwidth=100 * gbs / bw >= goal)


def run(device: torch.device, quick: bool = False) -> list[Results]:
    lin = Results("lora_linear", device, title="Fused LoRA Linear (bf16 activations)",
                  key=["shape", "tokens", "r", "activations", "adapters", "dropout"])
    lin.notes.append("times in ms (median); bwd = fwd+bwd - fwd; saved_MB = bytes autograd keeps for "
                     "backward (parameters excluded); ratios from the same run")
    lin.notes.append("fused backend: " + ("triton" if device.type == "cuda" else
                                          "cpu (ATen base GEMMs + C++ rank-r kernels)"))
    lin.notes.append(f"meets_vs_base: fused fwd+bwd <= {GOAL_VS_BASE}x base; meets_vs_peft: fused - base <= "
                     f"{GOAL_OVERHEAD_VS_PEFT} x (peft - base); saved_le_peft: fused saved_MB <= peft's; "
                     "meets_goal1: fused fwd+bwd <= peft's")
    if device.type == "cuda":
        shapes, tokens, ranks = LLAMA8B, [2048, 8192], [8, 16, 64]
        if quick:
            shapes, tokens, ranks = LLAMA8B[:2], [2048], [16]
    elif quick:
        shapes, tokens, ranks = [(1024, 1024), (1024, 256)], [128], [16]
    else:
        shapes, tokens, ranks = LLAMA8B, [256, 2048], [16]
        lin.notes.append("CPU full run: Llama-8B shapes at 256 and 2048 tokens (not 8192) and r = 16 only "
                         "(about 15 minutes on 2 cores)")
    act = torch.bfloat16 if harness.native_bf16(device) else torch.float32
    if act != torch.bfloat16:
        lin.title = "Fused LoRA Linear (fp32 activations: this CPU has no native bf16 matmul)"
        lin.notes.append("this CPU has no native bf16 matmul (oneDNN's reference path, ~1000x slower than fp32, "
                         "hours for this table), so activations and adapters are fp32 here; the goals are "
                         "stated for bf16 activations and are judged on these fp32 rows")
    _linear_rows(lin, device, shapes, tokens, ranks, quick, act)
    mm = harness.matmul_throughput(device, act)
    lin.notes.append(f"fused_TFLOPs: (4 T in out + 6 T r (in + out)) / fused fwd+bwd time; pct_matmul: of the "
                     f"measured {str(act).replace('torch.', '')} matmul throughput, {mm:.3g} TFLOP/s")
    lin.plot(["speedup_vs_peft_fwdbwd", "speedup_vs_peft_fwd"], label=["shape", "tokens", "r", "adapters"],
             title="Fused LoRA Linear: speed-up over peft lora.Linear")
    lin.plot(["fused_vs_base_fwdbwd", "peft_vs_base_fwdbwd"], label=["shape", "tokens", "r", "adapters"],
             kind="value", limits=[(1.0, "frozen base Linear alone")],
             xlabel="fwd+bwd time / base Linear fwd+bwd time (lower is better)",
             title="Cost of the adapter over the frozen base layer")
    lin.plot(["fused_TFLOPs"], label=["shape", "tokens", "r", "adapters"], kind="value", limits=harness.matmul_limits(device),
             xlabel="TFLOP/s", title="Fused LoRA Linear fwd+bwd throughput")
    merge = run_merge(device, quick)
    # fp32 only where bf16 GEMMs have no native units (seconds to minutes each)
    return [lin, merge] + run_dora(device, quick, ("bf16", "fp32") if harness.native_bf16(device) else ("fp32",))


def run_merge(device: torch.device, quick: bool = False, dtypes=("bf16", "fp32")) -> Results:
    merge = Results("lora_merge", device, title="LoRA merge (W += s B A in place)", key=["shape", "r", "weight"])
    merge.notes.append("GB/s counts W read + written; peft = delta materialised then added")
    m_shapes = [(1024, 1024)] if quick else LLAMA8B
    _merge_rows(merge, device, m_shapes, [16] if quick else [16, 64], quick, dtypes)
    merge.plot(["speedup_vs_peft"], label=["shape", "r", "weight"], title="LoRA merge: speed-up over peft's merge")
    merge.plot(["GBps"], label=["shape", "r", "weight"], kind="value",
               limits=harness.bandwidth_limits(device), xlabel="GB/s",
               title="LoRA merge: achieved bandwidth")
    return merge


def _main_part(part: str) -> None:
    """``--dora`` / ``--merge``: only those rows; ``--dora-dtypes fp32,bf16`` picks the
    activations' dtypes, ``--merge-dtypes bf16,fp32,fp16`` W's."""
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(f"--{part}", action="store_true")
    p.add_argument(f"--{part}-dtypes", default="bf16,fp32")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dtypes = tuple(getattr(args, f"{part}_dtypes").split(","))
    runner = run_dora if part == "dora" else lambda d, q, t: [run_merge(d, q, t)]
    for r in runner(torch.device(args.device), args.quick, dtypes):
        print(r.markdown())
        print("written:", r.write())


if __name__ == "__main__":
    import sys

    if "--dora" in sys.argv or "--merge" in sys.argv:
        _main_part("dora" if "--dora" in sys.argv else "merge")
    else:
        harness.main(run, __doc__)
