"""End-to-end LoRA fine-tuning on the embedded task (llmopt_ext.finetune):

1. ``finetune_lora_layer``: steps/s and tokens/s of the same AdamW run with peft's LoRA Linear
   vs llmopt_ext's fused one (ratio measured in the same run);
2. ``finetune_optimizers``: AdamW with a small learning-rate sweep vs each tuning-free /
   second-order optimizer at its defaults: final eval loss, exact match, steps/s.

    python -m bench.bench_finetune [--quick] [--device cuda]

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

ADAMW_SWEEP = (5e-4, 1e-3, 2e-3, 5e-3)
OTHERS = ("golore", "sophiag", "sophiah", "adahessian", "oasis", "aisarah", "trcg")


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
        for name, flag in (("peft", "--no-fused"), ("fused", "--fused")):
            r = _finetune(device, os.path.join(tmp, name), [*size, "--no-eval", flag])
            rows[name] = r["train"]
        for name, t in rows.items():
            res.add(layer=name, steps_per_s=t["steps_per_s"], tokens_per_s=t["tokens_per_s"],
                    vs_peft=t["steps_per_s"] / rows["peft"]["steps_per_s"])
        res.plot(["vs_peft"], label=["layer"], title="Fine-tuning steps/s relative to peft's LoRA Linear")
        out.append(res)

        # 2) optimizers
        res = Results("finetune_optimizers", device,
                      title="Embedded task: AdamW (LR sweep) vs tuning-free optimizers at defaults")
        res.notes.append(f"{steps} steps, batch {size[size.index('--batch-size') + 1]}, fused LoRA "
                         "r=8, fp32, seed 0; eval on held-out generated examples (greedy exact match)")
        runs = [("adamw", ["--lr", str(lr)]) for lr in ADAMW_SWEEP] + [(o, []) for o in OTHERS]
        base = None
        for opt, extra in runs:
            try:
                r = _finetune(device, os.path.join(tmp, "-".join([opt, *extra])), [*size, "--optimizer", opt, *extra])
            except RuntimeError as e:  # an optimizer that breaks down is a result, not a crash
                res.add(optimizer=opt, lr="default", eval_loss=float("nan"), exact_match=float("nan"),
                        steps_per_s="", seconds="")
                res.notes.append(f"{opt}: {e}")
                continue
            if base is None:
                base = r["before"]
                res.add(optimizer="(base model)", lr="", eval_loss=base["eval_loss"],
                        exact_match=base["exact_match"], steps_per_s="", seconds="")
            lr = r["options"]["lr"]
            label = opt if opt != "adamw" else f"adamw lr={lr:g}"
            res.add(optimizer=opt, lr=lr if lr is not None else ("default" if opt not in ("trcg", "aisarah")
                                                                 else "none"),
                    eval_loss=r["after"]["eval_loss"], exact_match=r["after"]["exact_match"],
                    steps_per_s=r["train"]["steps_per_s"], seconds=r["train"]["seconds"])
            steps_done, losses = zip(*r["train"]["history"])
            res.curve(label, steps_done, _smooth(losses), title="Training loss (moving average over 10 steps)",
                      xlabel="step", ylabel="training loss")
        adamw = [row for row in res.rows if row["optimizer"] == "adamw" and math.isfinite(row["eval_loss"])]
        if not adamw:
            return out + [res]
        best = min(adamw, key=lambda row: row["eval_loss"])
        res.notes.append(f"best AdamW of the sweep: lr={best['lr']:g}, eval loss {best['eval_loss']:.3f}; "
                         "eval_vs_best_adamw = eval loss / that (lower is better, 1 = as good as tuned AdamW)")
        for row in res.rows:
            if row["optimizer"] != "(base model)":
                row["eval_vs_best_adamw"] = row["eval_loss"] / best["eval_loss"]
        res.plot(["eval_loss"], label=["optimizer", "lr"], kind="value",
                 limits=[(best["eval_loss"], "best AdamW of the sweep")], xlabel="eval loss after training",
                 title="Eval loss: AdamW LR sweep vs tuning-free optimizers at defaults (lower is better)")
        res.plot(["exact_match"], label=["optimizer", "lr"], kind="value", xlabel="exact-match accuracy",
                 title="Exact match on held-out generated tasks (higher is better)")
        out.append(res)
    return out


if __name__ == "__main__":
    from .harness import main
    main(run, __doc__)
