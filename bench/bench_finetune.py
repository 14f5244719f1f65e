"""End-to-end LoRA fine-tuning on the embedded task (llmopt_ext.finetune):

1. ``finetune_lora_layer``: steps/s and tokens/s of the same AdamW run with peft's LoRA Linear
   vs llmopt_ext's fused one (ratio measured in the same run);
2. ``finetune_optimizers``: AdamW with a learning-rate sweep vs the tuning-free optimizers
   users pick instead (Schedule-Free AdamW, Prodigy, D-Adaptation Adam: optional packages,
   driven through the same plain-backward path as AdamW) and every project optimizer at its
   defaults, for two seeds: final eval loss, exact match, steps/s; at equal steps AND at equal
   wall-clock (each non-AdamW run stopped at the best AdamW run's training time,
   ``--max-seconds``);
3. ``finetune_optimizers_real`` (only with ``LLMOPT_BENCH_REAL=1``; needs the real-model
   fixture, ``python -m llmopt_ext.finetune.real_model``): the same comparison on
   SmolLM2-135M-Instruct fine-tuned on the embedded task's examples in its chat template, at a
   size a 2-core CPU runs in well under an hour: 400 training / 32 held-out examples,
   sequences <= 64 tokens, batch 4, 20 steps, LoRA r=8 on all 7 projections.

    python -m bench.bench_finetune [--quick] [--device cuda]
    LLMOPT_BENCH_REAL=1 LLMOPT_BENCH_ONLY=real python -m bench.bench_finetune

``LLMOPT_BENCH_ONLY`` = ``layer``, ``embedded`` or ``real`` runs one part;
``LLMOPT_BENCH_OPTIMIZERS`` (comma-separated CLI names) restricts the non-AdamW rows;
``LLMOPT_BENCH_SEEDS`` (comma-separated) the seeds (then the result is named per seed, so
one process per seed can run side by side); ``LLMOPT_BENCH_BUDGETS=steps`` skips the
equal-time runs.

Wall-clock timing of whole runs is valid here: the loop reads the loss to the host every step
(one synchronisation per step), so no launch is left in flight when the clock stops.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile

import torch

from .harness import Results

ADAMW_SWEEP = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
PEERS = ("schedulefree", "prodigy", "dadapt_adam")
OTHERS = ("sf-width", "hyperadamw", "golore", "sophiag", "sophiah", "adahessian", "oasis", "aisarah", "trcg")
SEEDS = (0, 1)


def _available(opt: str) -> bool:
    from llmopt_ext.finetune.optimizers import UsageError, optimizer_class
    try:
        optimizer_class(opt)
        return True
    except UsageError:
        return False


def _finetune(device: torch.device, out: str, argv: list[str]) -> dict:
    from llmopt_ext.finetune.cli import build_parser
    from llmopt_ext.finetune.train import run

    args = build_parser().parse_args(["--device", device.type, "--output-dir", out,
                                      "--no-progress", "--threads", "0", *argv])
    with contextlib.redirect_stdout(io.StringIO()):
        return run(args)


def _smooth(values, window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _part(name: str) -> bool:
    only = os.environ.get("LLMOPT_BENCH_ONLY")
    return only is None or only == name


def run(device: torch.device, quick: bool = False) -> list[Results]:
    steps = 10 if quick else 300
    size = ["--train-size", "400" if quick else "4000", "--eval-size", "16" if quick else "200",
            "--em-samples", "16" if quick else "200", "--max-new-tokens", "12",
            "--batch-size", "8" if quick else "16", "--max-steps", str(steps)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        # 1) LoRA layer: peft vs fused, AdamW, no eval
        res = Results("finetune_lora_layer", device,
                      title="Fine-tuning throughput: peft LoRA Linear vs fused LoRA Linear")
        res.notes.append(f"embedded 0.67M-parameter char-level Llama, LoRA r=8 on all 7 linear "
                         f"projections, AdamW, {steps} steps, fp32")
        rows = {}
        for name, flag in (("peft", "--no-fused"), ("fused", "--fused")) if _part("layer") else ():
            r = _finetune(device, os.path.join(tmp, name), [*size, "--no-eval", flag])
            rows[name] = r["train"]
        for name, t in rows.items():
            res.add(layer=name, steps_per_s=t["steps_per_s"], tokens_per_s=t["tokens_per_s"],
                    vs_peft=t["steps_per_s"] / rows["peft"]["steps_per_s"])
        if rows:
            res.plot(["vs_peft"], label=["layer"],
                     title="Fine-tuning steps/s relative to peft's LoRA Linear")
            out.append(res)

        # 2) optimizers, embedded task
        if _part("embedded"):
            out.append(_optimizers(device, tmp, size, steps, quick))
        # 3) optimizers, real model
        if os.environ.get("LLMOPT_BENCH_REAL") == "1" and _part("real"):
            out.append(_optimizers_real(device, tmp))
    return out


REAL_SWEEP = (2e-4, 5e-4, 1e-3, 2e-3, 5e-3)  # 5e-3 and more diverge-prone on a 135M model


def _optimizers_real(device, tmp) -> Results:
    from llmopt_ext.finetune import real_model
    steps = 20
    size = ["--model", real_model.convert(), "--train-size", "400", "--eval-size", "32",
            "--em-samples", "4", "--max-new-tokens", "8", "--batch-size", "4",
            "--max-length", "64", "--max-steps", str(steps)]
    return _optimizers(device, tmp, size, steps, False, sweep=REAL_SWEEP,
                       others=PEERS + ("sf-width", "hyperadamw", "adahessian", "trcg"),
                       name="finetune_optimizers_real",
                       title="SmolLM2-135M-Instruct: AdamW (LR sweep) vs tuning-free optimizers "
                             "at defaults")


def _row(res, r, opt, extra, seed, budget):
    lr = r["options"]["lr"]
    res.add(optimizer=opt, lr=lr if lr is not None else "default", seed=seed, budget=budget,
            eval_loss=r["after"]["eval_loss"], exact_match=r["after"]["exact_match"],
            steps=r["train"]["steps"], steps_per_s=r["train"]["steps_per_s"],
            seconds=r["train"]["seconds"])


def _optimizers(device, tmp, size, steps, quick, sweep=None, others=None,
                name="finetune_optimizers",
                title="Embedded task: AdamW (LR sweep) vs tuning-free optimizers at defaults") -> Results:
    seeds = SEEDS[:1] if quick else SEEDS
    if os.environ.get("LLMOPT_BENCH_SEEDS"):
        seeds = tuple(int(x) for x in os.environ["LLMOPT_BENCH_SEEDS"].split(","))
        name += "_seed" + "_".join(map(str, seeds))
    res = Results(name, device, title=title)
    res.notes.append(f"{steps} steps, batch {size[size.index('--batch-size') + 1]}, fused LoRA "
                     f"r=8, fp32, seeds {seeds}; eval on held-out generated examples (greedy exact "
                     "match); budget 'steps' = all steps, 'time' = stopped at the best AdamW "
                     "run's training time of the same seed")
    # quick (CI): enough to exercise every code path, not a measurement
    sweep = sweep or (ADAMW_SWEEP[2:3] if quick else ADAMW_SWEEP)
    others = others or (("schedulefree", "hyperadamw", "sophiag", "trcg") if quick
                        else PEERS + OTHERS)
    chosen = os.environ.get("LLMOPT_BENCH_OPTIMIZERS")
    if chosen:
        others = [o for o in others if o in chosen.split(",")]
    others = [o for o in others if _available(o)]
    missing = [o for o in PEERS if not _available(o)]
    if missing:
        res.notes.append(f"not installed, skipped: {', '.join(missing)}")
    for seed in seeds:
        best = None
        runs = [("adamw", ["--lr", str(lr)]) for lr in sweep] + [(o, []) for o in others]
        for opt, extra in runs:
            budgets = [("steps", [])]
            if opt != "adamw" and best is not None and \
                    os.environ.get("LLMOPT_BENCH_BUDGETS", "steps,time") != "steps":
                budgets.append(("time", ["--max-seconds", f"{best['train']['seconds']:.3f}"]))
            for budget, cut in budgets:
                argv = [*size, "--optimizer", opt, "--seed", str(seed), *extra, *cut]
                try:
                    r = _finetune(device, os.path.join(tmp, f"{opt}-{seed}-{budget}-{len(res.rows)}"), argv)
                except RuntimeError as e:  # an optimizer that breaks down is a result, not a crash
                    res.add(optimizer=opt, lr="default", seed=seed, budget=budget,
                            eval_loss=float("nan"), exact_match=float("nan"))
                    res.notes.append(f"{opt} seed {seed}: {e}")
                    continue
                _row(res, r, opt, extra, seed, budget)
                if opt == "adamw" and (best is None or r["after"]["eval_loss"] < best["after"]["eval_loss"]):
                    best = r
                if seed == seeds[0] and budget == "steps":
                    label = opt if opt != "adamw" else f"adamw lr={r['options']['lr']:g}"
                    steps_done, losses = zip(*r["train"]["history"])
                    per_step = r["train"]["seconds"] / max(1, r["train"]["steps"])
                    res.curve(label, [k * per_step for k in steps_done], _smooth(losses),
                              xlabel="training seconds (step x mean step time)", ylabel="training loss",
                              title="Training loss vs time (moving average over 10 steps), seed 0")
        res.notes.append(f"seed {seed}: base model eval loss {best['before']['eval_loss']:.3f}; best "
                         f"AdamW lr={best['options']['lr']:g}, eval loss {best['after']['eval_loss']:.3f} "
                         f"in {best['train']['seconds']:.1f} s")
        for row in res.rows:
            if row["seed"] == seed:
                row["eval_vs_best_adamw"] = row["eval_loss"] / best["after"]["eval_loss"]
    res.plot(["eval_vs_best_adamw"], label=["optimizer", "lr", "seed", "budget"], kind="value",
             limits=[(1.0, "best AdamW of the sweep")], xlabel="eval loss / best AdamW (lower is better)",
             title="Eval loss relative to the best AdamW of the sweep, equal steps and equal time")
    return res


if __name__ == "__main__":
    from .harness import main
    main(run, __doc__)
