"""``llmopt-finetune`` / ``python -m llmopt_ext.finetune``: LoRA fine-tuning of a causal LM.

With no arguments it fine-tunes the embedded base model (a 0.67M-parameter character-level
Llama this project pretrains and ships, see :mod:`llmopt_ext.finetune.pretrain`) on the
embedded instruction task (:mod:`llmopt_ext.finetune.data`), on CPU in a few minutes, and
reports eval loss and exact-match accuracy before and after.

    python -m llmopt_ext.finetune                       # embedded defaults, AdamW
    python -m llmopt_ext.finetune --optimizer trcg      # tuning-free trust-region Newton-CG
    python -m llmopt_ext.finetune --model ./my-llama --data alpaca.jsonl --precision bf16
    torchrun --nproc_per_node=2 -m llmopt_ext.finetune  # DDP (gloo on CPU, NCCL on GPU)

Outputs in --output-dir: ``adapter/`` (peft format: ``PeftModel.from_pretrained(base, dir)``),
``results.json``, ``config.yaml`` (the options: ``--config`` repeats the run),
``loss_curve.png`` (when matplotlib is installed), ``checkpoint/`` with
--save-every (resume with --resume DIR/checkpoint), ``merged/`` with --merge. An --output-dir
that holds a previous run is refused unless --overwrite is given or the run resumes from that
directory's own checkpoint.

Ctrl-C (SIGINT) or SIGTERM during training (or the evaluation after it): the current step
finishes, then the adapter, checkpoint/ and a results.json marked "interrupted" are saved and
the exit code is 130 / 143; continue with --resume DIR/checkpoint. Bad input (options, data, model, checkpoint) exits with
code 2 and one line ``llmopt-finetune: error: ...``.

--resume: the checkpoint must have been written with the same options, except --max-steps
(the cosine schedule is re-laid over the new total), --save-every, --output-dir, --overwrite,
--device, --threads, --no-progress, --ddp-timeout and the evaluation / output options
(--no-eval, --em-samples, --max-new-tokens, --generate, --generate-input, --merge); any other
difference (e.g. --lr, LoRA rank, data, batch size, seed, precision) is refused, naming both
values.
"""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, config_defaults
from .data import TEMPLATE_NAMES, DataError
from .train import OPTIMIZERS, Interrupted, UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmopt-finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="local Hugging Face causal-LM checkpoint "
                   "(default: the embedded base model)")
    g.add_argument("--data", default=None, help="Alpaca-style .json (a list) or .jsonl file with "
                   "instruction / input / output, or conversational JSONL ({\"messages\": [{\"role\": "
                   "system|user|assistant, \"content\": ...}, ...]}) (default: the embedded task)")
    g.add_argument("--template", choices=TEMPLATE_NAMES, default=None,
                   help="prompt format: chat (the tokenizer's chat template, loss on the assistant "
                   "turns only), alpaca or compact (default: compact for the embedded model, chat "
                   "for a --model whose tokenizer has a chat template, alpaca otherwise)")
    g.add_argument("--max-length", type=int, default=256, help="tokens per example (truncated)")
    g.add_argument("--train-size", type=int, default=4000, help="embedded task: training examples")
    g.add_argument("--eval-size", type=int, default=200, help="held-out examples (embedded task), "
                   "or the cap of the 10%% split of --data")
    g.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA: bitsandbytes NF4 base weights (CUDA only)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rsLoRA)")
    g.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names, or all-linear")
    g.add_argument("--fused", dest="fused", action="store_true", default=True,
                   help="llmopt_ext's fused LoRA Linear (default)")
    g.add_argument("--no-fused", dest="fused", action="store_false", help="peft's own LoRA Linear")

    _optimisation_args(p.add_argument_group("optimisation"))
    _run_args(p.add_argument_group("run"))
    return p


def _optimisation_args(g) -> None:
    g.add_argument("--optimizer", default="adamw", help=f"one of {', '.join(OPTIMIZERS)}")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default per optimizer; "
                   "trcg and aisarah have none)")
    g.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="3%% linear warmup then cosine decay (adamw, golore, sophiag/h, adahessian)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping for adamw/golore (0: off)")
    g.add_argument("--hessian-every", type=int, default=10,
                   help="sophiag/sophiah: steps between Hessian-diagonal refreshes")
    g.add_argument("--cg-iters", type=int, default=10, help="trcg: CG iterations (HVPs) per step")
    g.add_argument("--aisarah-anchor", type=int, default=256, metavar="N",
                   help="aisarah: a fixed sample of N training examples whose gradient starts each "
                   "outer loop, in place of the full-data gradient (0: the current mini-batch)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=600)
    g.add_argument("--max-seconds", type=float, default=0.0,
                   help="stop training after this many seconds of steps (0: off); for "
                   "equal-time comparisons (the schedule still spans --max-steps)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype (fp16 uses a GradScaler)")
    g.add_argument("--seed", type=int, default=0)


def _run_args(g) -> None:
    g.add_argument("--config", default=None, metavar="YAML", help="options from a YAML file "
                   "(keys: the long option names); flags given here override it. Every run saves "
                   "its options as <output-dir>/config.yaml")
    g.add_argument("--output-dir", default="finetune-out")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--save-every", type=int, default=0, help="write <output-dir>/checkpoint every N steps")
    g.add_argument("--resume", default=None, help="checkpoint directory to resume from (which "
                   "options may change on resume: see above)")
    g.add_argument("--overwrite", action="store_true",
                   help="allow an --output-dir that holds a previous run (its files are replaced)")
    g.add_argument("--ddp-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="torchrun: a collective waiting longer than this for another rank fails "
                   "the job, naming the rank (default 600; gloo's own default is 30 minutes)")
    g.add_argument("--no-eval", dest="eval", action="store_false", default=True)
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="eval loss every N steps (results.json eval_history, loss curve)")
    g.add_argument("--em-samples", type=int, default=200, help="eval examples for exact match")
    g.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens for exact match")
    g.add_argument("--generate", default=None, metavar="PROMPT",
                   help="after training, print a greedy sample for this instruction")
    g.add_argument("--generate-input", default="", help="the input field for --generate")
    g.add_argument("--merge", action="store_true", help="also save merged full weights")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    from .plan import add_cli_flag
    add_cli_flag(g)


def parse_args(argv=None) -> argparse.Namespace:
    """The options: --config's YAML as the parser's defaults, then the command line over them."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**config_defaults(parser, known.config))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.plan:
            from .plan import plan_main
            return plan_main(args)
        from .train import run
        run(args)
    except (DataError, UsageError, ConfigError) as e:
        print(f"llmopt-finetune: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # the run saved what it had: 128 + signal, as a shell reports it
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C before training started (or a second Ctrl-C)
        print("llmopt-finetune: interrupted (nothing saved beyond earlier checkpoints)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
