"""The fine-tuning loop behind ``llmopt-finetune``: model and LoRA set-up, one step function per
optimizer family, evaluation (loss and greedy exact match), checkpoints, and the outputs.

Optimizer families (each optimizer's docstring is the authority):

* plain backward: ``adamw``, ``golore`` (:class:`~llmopt_ext.optim.GoLoreAdamW` on the LoRA
  matrices, rank r/2 so both A (r x in) and B (out x r) are projected), ``sophiag`` (+ a GNB
  Hessian refresh every ``--hessian-every`` steps, :func:`~llmopt_ext.optim.gnb_loss` on the
  batch's own logits);
* backward with ``create_graph=True``: ``adahessian`` (every step) and ``sophiah`` (on the steps
  that refresh its Hutchinson estimate);
* closure: ``trcg`` and ``aisarah`` (closure returns the loss, no backward; called again at the
  trial point, so the model runs in eval mode -- no dropout -- to keep it deterministic),
  ``oasis`` (closure does zero_grad + backward(create_graph=True)).

Hessian-vector products need double backward through attention: the model is loaded with
``attn_implementation="eager"`` for the second-order optimizers (SDPA's fused CPU/CUDA kernels
have no double backward, see BUILD-NOTES).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import data as D

OPTIMIZERS = ("adamw", "trcg", "sophiag", "sophiah", "adahessian", "oasis", "aisarah", "golore")
HVP_OPTIMIZERS = ("trcg", "sophiah", "adahessian", "oasis", "aisarah")
CLOSURE_OPTIMIZERS = ("trcg", "aisarah", "oasis")
NO_LR = ("trcg", "aisarah")  # tuning-free: no learning rate at all
# Default learning rates (eta_0 for OASIS). AdamW / GoLore: 2e-3. bench/bench_finetune.py's
# sweep on the embedded task (300 steps, cosine): eval loss 1.07 / 0.707 / 0.371 / 0.355 at
# 5e-4 / 1e-3 / 2e-3 / 5e-3, so 2e-3 is within 5% of the best and a step below the largest
# rate tried. The others are their papers' / official code's defaults, except SophiaG (1e-4 is
# a pretraining value; 2e-3 keeps its per-element step bound equal to AdamW's).
DEFAULT_LR = {"adamw": 2e-3, "golore": 2e-3, "sophiag": 2e-3, "sophiah": 6e-2,
              "adahessian": 0.15, "oasis": 1e-3}
# Only these support fp16's GradScaler (they read grad_scale / found_inf or are plain AdamW).
FP16_OPTIMIZERS = ("adamw", "golore", "sophiag", "adahessian")


class UsageError(ValueError):
    """A bad combination of options: the message says what to change."""


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, flush=True)


# ------------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_arg: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then gloo on CPU, NCCL on CUDA."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return Dist()
    import torch.distributed as dist
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        return torch.device("cuda", d.local_rank)
    return torch.device(name)


# ----------------------------------------------------------------------------------- model

def base_model_dir() -> str:
    from .pretrain import BASE_DIR
    if not os.path.exists(os.path.join(BASE_DIR, "model.safetensors")):
        raise UsageError(f"the embedded base model is missing ({BASE_DIR}); build it with "
                         "`python -m llmopt_ext.finetune.pretrain` or pass --model PATH")
    return BASE_DIR


def load_model(args, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or base_model_dir()
    if args.model and not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: not a directory (a local Hugging Face checkpoint "
                         "with config.json and the weights is expected)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs: dict = {}
    if args.optimizer in HVP_OPTIMIZERS:
        kwargs["attn_implementation"] = "eager"
    if args.load_in_4bit:
        if device.type != "cuda":
            raise UsageError("--load-in-4bit needs a CUDA device (bitsandbytes NF4 kernels are "
                             "CUDA only); drop the flag to train the full-precision base on "
                             f"{device.type}")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from None
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if args.precision != "fp16" else torch.float16)
        kwargs["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    if not args.load_in_4bit:
        model.to(device)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def add_lora(model, args):
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if args.target_modules == "all-linear":
        targets = "all-linear"
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     use_rslora=args.rslora, target_modules=targets, task_type="CAUSAL_LM")
    if args.load_in_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if args.fused:
        from ..nn import use_fused_lora
        cfg = use_fused_lora(cfg)
    return get_peft_model(model, cfg)


# ------------------------------------------------------------------------------- optimizers

def make_optimizer(name: str, params: list, args, total_steps: int):
    from .. import optim as O

    lr = args.lr if args.lr is not None else DEFAULT_LR.get(name)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    if name == "golore":
        return O.GoLoreAdamW(params, lr=lr, weight_decay=args.weight_decay,
                             rank=max(1, args.lora_r // 2), update_proj_gap=50,
                             total_steps=total_steps, seed=args.seed)
    if name == "sophiag":
        return O.SophiaG(params, lr=lr, weight_decay=args.weight_decay, bs=1)
    if name == "sophiah":
        return O.SophiaH(params, lr=lr, weight_decay=args.weight_decay,
                         update_period=args.hessian_every, seed=args.seed)
    if name == "adahessian":
        return O.AdaHessian(params, lr=lr, weight_decay=args.weight_decay, seed=args.seed)
    if name == "oasis":
        return O.OASIS(params, lr=lr, seed=args.seed)
    if name == "aisarah":
        return O.AISARAH(params)
    if name == "trcg":
        return O.TRCG(params, preconditioner="abs_grad_ema", max_cg_iters=args.cg_iters)
    raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


SCHEDULED = ("adamw", "golore", "sophiag", "sophiah", "adahessian")  # OASIS adapts its own step


def make_scheduler(opt, args):
    """Linear warmup over 3% of the steps, then cosine decay to 0 (``--lr-schedule cosine``,
    the default) or constant, for the optimizers with a learning rate (OASIS' lr is only its
    first step). On the embedded task with AdamW at 2e-3, 600 steps: the constant rate
    plateaus from step ~300 at train loss ~0.35 (eval loss 0.3082, exact match 0.750); cosine:
    eval loss 0.3078, exact match 0.765."""
    if args.lr_schedule == "constant" or args.optimizer not in SCHEDULED:
        return None
    total, warm = args.max_steps, max(1, int(0.03 * args.max_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def anchor_batches(examples: list[dict], args, pad: int, d: Dist, device) -> list[D.Batch]:
    """AI-SARAH's stand-in for the full-data gradient: ``--aisarah-anchor`` training examples
    drawn once (seeded), this rank's share, in batches of ``--batch-size``. A mini-batch
    gradient as the outer-loop start carries its noise through every inner step. Embedded
    task, 300 steps, batch 16: eval loss 1.50 with the mini-batch start, 1.35 with a
    256-example anchor. Restarting more often (max_inner 25 or 100 instead of 1000) changed
    the training loss by < 10%: what limits AI-SARAH here is its direction, a variance-reduced
    raw gradient (SGD-like, no per-coordinate scaling), at the ~1e-2 step its curvature rule
    picks."""
    if args.optimizer != "aisarah" or args.aisarah_anchor <= 0:
        return []
    g = torch.Generator().manual_seed(args.seed * 1000003 + 7)
    picked = torch.randperm(len(examples), generator=g)[:args.aisarah_anchor].tolist()
    mine = picked[d.rank::d.world_size]
    return [D.collate([examples[i] for i in mine[j:j + args.batch_size]], pad).to(device)
            for j in range(0, len(mine), args.batch_size)]


def check_options(args) -> None:
    if args.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {args.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if args.lr is not None and args.optimizer in NO_LR:
        raise UsageError(f"--lr: {args.optimizer} has no learning rate (it is tuning-free)")
    if args.precision == "fp16" and args.optimizer not in FP16_OPTIMIZERS:
        raise UsageError(f"--precision fp16 needs a GradScaler, which {args.optimizer} does not "
                         f"support here (supported: {', '.join(FP16_OPTIMIZERS)}); use bf16 or fp32")
    if args.aisarah_anchor < 0:
        raise UsageError("--aisarah-anchor must be >= 0")
    for k in ("max_steps", "batch_size", "grad_accum", "lora_r", "max_length"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError("--lora-dropout must be in [0, 1)")


# ------------------------------------------------------------------------------- the steps

class Stepper:
    """One optimizer step over ``grad_accum`` micro-batches, for every optimizer family."""

    def __init__(self, args, model, ddp_model, opt, device, scaler, anchor=None):
        self.args, self.model, self.fwd, self.opt = args, model, ddp_model, opt
        self.device, self.scaler = device, scaler
        self.anchor = anchor or []  # AI-SARAH's outer-loop batches
        self.name = args.optimizer
        self.step_idx = 0
        self.gnb_gen = torch.Generator(device=device).manual_seed(args.seed + 17)

    def autocast(self):
        if self.args.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.args.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def loss_of(self, b: D.Batch, model=None) -> torch.Tensor:
        with self.autocast():
            out = (model or self.fwd)(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                      labels=b.labels)
        return out.loss.float()

    def __call__(self, batches: list[D.Batch]) -> float:
        n, name, opt = len(batches), self.name, self.opt
        if name in ("trcg", "aisarah"):
            def closure():
                return sum(self.loss_of(b) for b in batches) / n
            if name == "aisarah" and self.anchor:
                loss = opt.step(closure, full_closure=lambda: (self.loss_of(b) for b in self.anchor))
            else:
                loss = opt.step(closure)
        elif name == "oasis":
            def closure():
                opt.zero_grad(set_to_none=True)
                total = sum(self.loss_of(b) for b in batches) / n
                total.backward(create_graph=True)
                return total
            loss = opt.step(closure)
        else:
            if name == "adahessian":
                graph = True
            elif name == "sophiah":
                graph = opt.param_groups[0].get("step_count", 0) % opt.update_period == 0
            else:
                graph = False
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for b in batches:
                loss_t = self.loss_of(b) / n
                (self.scaler.scale(loss_t) if self.scaler else loss_t).backward(create_graph=graph)
                total += loss_t.detach()
            loss = total
            kw = {}
            if name == "sophiag":
                kw["bs"] = sum(int((b.labels != D.IGNORE_INDEX).sum()) for b in batches)
            if name in ("adamw", "golore") and self.args.max_grad_norm > 0:
                if self.scaler:
                    self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], self.args.max_grad_norm)
            if self.scaler:
                self.scaler.step(opt, **kw)
                self.scaler.update()
            else:
                opt.step(**kw)
            if graph:  # drop the graph held by .grad before the next forward
                opt.zero_grad(set_to_none=True)
            if name == "sophiag" and (self.step_idx + 1) % self.args.hessian_every == 0:
                b = batches[0]
                with self.autocast():
                    logits = self.fwd(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                opt.update_hessian_from_logits(logits, generator=self.gnb_gen,
                                               ignore_mask=b.labels == D.IGNORE_INDEX)
        self.step_idx += 1
        return float(loss.detach() if torch.is_tensor(loss) else loss)


# ------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def eval_loss(model, examples: list[dict], pad: int, device, batch_size: int = 32) -> float:
    """Token-weighted mean cross-entropy over the response tokens of ``examples``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = D.collate(examples[i:i + batch_size], pad).to(device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
        lab = b.labels[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab.reshape(-1),
                             ignore_index=D.IGNORE_INDEX, reduction="sum")
        total += float(ce)
        count += int((lab != D.IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], device, max_new_tokens: int,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy decoding of left-padded batches (explicit position ids, so padding does not shift
    positions); no KV cache: the sequences are short (<= ~100 tokens here)."""
    model.eval()
    pad, eos = D.pad_id(tokenizer), tokenizer.eos_token_id
    outs: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, n - len(p):] = torch.tensor(p)
            mask[j, n - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        gen = []
        for _ in range(max_new_tokens):
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            nxt = logits.argmax(-1)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            gen.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if bool(done.all()):
                break
        g = torch.stack(gen, 1).tolist()
        for row in g:
            outs.append(row[:row.index(eos)] if eos is not None and eos in row else row)
    return outs


def exact_match(model, tokenizer, records: list[dict], template: str, device,
                max_new_tokens: int) -> tuple[float, dict]:
    prompts = [tokenizer(D.format_prompt(r, template), add_special_tokens=True)["input_ids"]
               for r in records]
    outs = greedy_generate(model, tokenizer, prompts, device, max_new_tokens)
    per: dict[str, list[int]] = {}
    for r, o in zip(records, outs):
        ok = tokenizer.decode(o, skip_special_tokens=True).strip() == r["output"].strip()
        per.setdefault(r.get("task", "file"), []).append(int(ok))
    allv = [v for vs in per.values() for v in vs]
    return sum(allv) / max(len(allv), 1), {k: sum(v) / len(v) for k, v in sorted(per.items())}


def evaluate(model, tokenizer, args, eval_records, eval_examples, device) -> dict:
    was_training = model.training
    loss = eval_loss(model, eval_examples, D.pad_id(tokenizer), device)
    em_records = eval_records[:args.em_samples]
    acc, per = exact_match(model, tokenizer, em_records, args.template, device, args.max_new_tokens)
    model.train(was_training)
    return {"eval_loss": loss, "exact_match": acc, "exact_match_by_task": per,
            "em_samples": len(em_records)}


# ------------------------------------------------------------------------------- checkpoints

def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path, model, opt, scaler, stream, step, history, extra=None) -> None:
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "state.pt.tmp")
    torch.save({"step": step, "params": {n: p.detach().cpu() for n, p in trainable(model).items()},
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "stream": stream.state_dict(), "history": history, "extra": extra or {},
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               tmp)
    os.replace(tmp, os.path.join(path, "state.pt"))  # never a half-written checkpoint


def load_checkpoint(path, model, opt, scaler, stream) -> tuple[int, list, dict]:
    f = os.path.join(path, "state.pt")
    if not os.path.exists(f):
        raise UsageError(f"--resume {path}: no checkpoint (state.pt) there")
    ck = torch.load(f, map_location="cpu", weights_only=False)
    params = trainable(model)
    missing = set(params) ^ set(ck["params"])
    if missing:
        raise UsageError(f"--resume {path}: the checkpoint's trainable parameters do not match "
                         f"this model/LoRA configuration (e.g. {sorted(missing)[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ck["params"][n])
    opt.load_state_dict(ck["optimizer"])
    if scaler and ck["scaler"]:
        scaler.load_state_dict(ck["scaler"])
    stream.load_state_dict(ck["stream"])
    torch.set_rng_state(ck["rng"]["torch"])
    random.setstate(ck["rng"]["python"])
    if ck["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["step"], ck["history"], ck.get("extra", {})


# ------------------------------------------------------------------------------- outputs

def plot_loss(history: list, path: str) -> str | None:
    """Writes the loss curve; returns a note instead when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss-curve PNG (pip install matplotlib)"
    steps = [h[0] for h in history]
    losses = [h[1] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="train loss")
    k = max(1, len(losses) // 20)
    if len(losses) > k:
        sm = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
              for i in range(len(losses))]
        ax.plot(steps, sm, lw=1.5, label=f"moving mean ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------- main loop

def run(args) -> dict:
    """Fine-tunes, evaluates and saves as the options say; returns the results dict (also
    written to ``<output-dir>/results.json`` by rank 0)."""
    check_options(args)
    d = init_distributed(args.device)
    device = resolve_device(args.device, d)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # data first: a bad file fails before the model loads
    if args.data:
        records = D.load_alpaca(args.data)
        rng = random.Random(args.seed)
        order = list(range(len(records)))
        rng.shuffle(order)
        n_eval = min(args.eval_size, max(1, len(records) // 10)) if len(records) > 1 else 0
        eval_records = [records[i] for i in order[:n_eval]]
        train_records = [records[i] for i in order[n_eval:]] or records
    else:
        train_records = D.generate_dataset(args.train_size, seed=args.seed)
        # a different seed stream for the held-out set
        eval_records = D.generate_dataset(args.eval_size, seed=args.seed + 1_000_003)
    template = args.template or ("compact" if not args.model else "alpaca")
    args.template = template

    model, tokenizer = load_model(args, device)
    train_ex = D.encode_dataset(tokenizer, train_records, template, args.max_length,
                                what=args.data or "embedded dataset")
    eval_ex = D.encode_dataset(tokenizer, eval_records, template, args.max_length,
                               what="eval split") if eval_records else []

    if args.optimizer in CLOSURE_OPTIMIZERS and args.lora_dropout > 0:
        log(f"note: {args.optimizer} re-evaluates its closure, which must be deterministic: "
            "LoRA dropout set to 0", d.rank)
        args.lora_dropout = 0.0
    model = add_lora(model, args)
    n_train = sum(p.numel() for p in trainable(model).values())
    n_all = sum(p.numel() for p in model.parameters())
    log(f"model {args.model or 'embedded base'}: {n_all:,} parameters, {n_train:,} trainable "
        f"(LoRA r={args.lora_r}, {'fused' if args.fused else 'peft'} layer); "
        f"{len(train_ex)} train / {len(eval_ex)} eval examples; device {device}, "
        f"precision {args.precision}, optimizer {args.optimizer}", d.rank)

    results: dict = {"options": {k: v for k, v in vars(args).items() if not callable(v)}}
    if eval_ex and args.eval and d.rank == 0:
        results["before"] = evaluate(model, tokenizer, args, eval_records, eval_ex, device)
        log(f"before: eval loss {results['before']['eval_loss']:.4f}, exact match "
            f"{results['before']['exact_match']:.3f}", d.rank)

    params = list(trainable(model).values())
    opt = make_optimizer(args.optimizer, params, args, args.max_steps)
    sched = make_scheduler(opt, args)
    scaler = None
    if args.precision == "fp16":
        scaler = torch.amp.GradScaler(device.type)
    ddp_model = model
    if d.enabled and args.optimizer not in HVP_OPTIMIZERS:
        # the second-order optimizers average gradients (and HVPs) themselves and need the
        # local graph, so they must NOT be wrapped (their docstrings)
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    stream = D.BatchStream(train_ex, args.batch_size, D.pad_id(tokenizer), args.seed,
                           d.rank, d.world_size)
    stepper = Stepper(args, model, ddp_model, opt, device, scaler,
                      anchor_batches(train_ex, args, D.pad_id(tokenizer), d, device))

    start, history = 0, []
    if args.resume:
        start, history, extra = load_checkpoint(args.resume, model, opt, scaler, stream)
        stepper.step_idx = start
        if "gnb_gen" in extra:  # SophiaG's GNB label sampler
            stepper.gnb_gen.set_state(extra["gnb_gen"])
        if sched is not None and extra.get("sched"):
            sched.load_state_dict(extra["sched"])
        log(f"resumed from {args.resume} at step {start}", d.rank)

    if args.optimizer in CLOSURE_OPTIMIZERS:
        model.eval()  # deterministic closure (no dropout anywhere)
    else:
        model.train()
    from tqdm.auto import tqdm
    bar = tqdm(total=args.max_steps, initial=start, disable=d.rank != 0 or not args.progress,
               desc=f"finetune {args.optimizer}", dynamic_ncols=True)
    from ..nn import fallback_counts, reset_fallback_counts
    reset_fallback_counts()
    t0, tokens = time.perf_counter(), 0
    for step in range(start, args.max_steps):
        batches = [stream.next().to(device) for _ in range(args.grad_accum)]
        try:
            loss = stepper(batches)
        except Exception as e:  # name the step: optimizer failures are otherwise context-free
            raise RuntimeError(f"{args.optimizer} step {step + 1} failed: {type(e).__name__}: {e}") from e
        if sched is not None:
            sched.step()
        if not math.isfinite(loss):
            log(f"warning: non-finite loss {loss} at step {step}", d.rank)
        tokens += sum(b.n_tokens for b in batches) * d.world_size
        history.append((step + 1, loss))
        dt = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(dt, 1e-9):.0f}")
        bar.update(1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.max_steps \
                and d.rank == 0:
            save_checkpoint(os.path.join(args.output_dir, "checkpoint"), model, opt, scaler,
                            stream, step + 1, history, {"gnb_gen": stepper.gnb_gen.get_state(),
                                                        "sched": sched.state_dict() if sched else None})
    bar.close()
    train_time = time.perf_counter() - t0
    done_steps = args.max_steps - start
    results["train"] = {"steps": done_steps, "seconds": train_time,
                        "steps_per_s": done_steps / max(train_time, 1e-9),
                        "tokens_per_s": tokens / max(train_time, 1e-9),
                        "final_loss": history[-1][1] if history else None,
                        "history": history}
    if args.fused:  # forwards of the fused layer that ran peft's code instead (reason -> count)
        results["train"]["fused_fallbacks"] = fallback_counts()
    if d.enabled:  # ranks must agree: the optimizers keep parameters identical
        import torch.distributed as dist
        flat = torch.cat([p.detach().float().reshape(-1) for p in params])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        results["train"]["max_rank_param_diff"] = float((flat - ref).abs().max())

    if d.rank == 0:
        if eval_ex and args.eval:
            results["after"] = evaluate(model, tokenizer, args, eval_records, eval_ex, device)
            log(f"after {args.max_steps} steps: eval loss {results['after']['eval_loss']:.4f}, "
                f"exact match {results['after']['exact_match']:.3f} "
                f"{results['after']['exact_match_by_task']}")
        os.makedirs(args.output_dir, exist_ok=True)
        model.save_pretrained(os.path.join(args.output_dir, "adapter"))
        tokenizer.save_pretrained(os.path.join(args.output_dir, "adapter"))
        note = plot_loss(history, os.path.join(args.output_dir, "loss_curve.png"))
        if note:
            results["notes"] = [note]
            log(f"note: {note}")
        if args.generate:
            ids = tokenizer(D.format_prompt({"instruction": args.generate, "input": args.generate_input},
                                            template), add_special_tokens=True)["input_ids"]
            out = greedy_generate(model, tokenizer, [ids], device, args.max_new_tokens * 4)[0]
            results["generation"] = tokenizer.decode(out, skip_special_tokens=True)
            log(f"--generate {args.generate!r} -> {results['generation']!r}")
        if args.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(os.path.join(args.output_dir, "merged"))
            tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
        results["options"] = {k: v for k, v in vars(args).items()}
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        log(f"saved adapter, results.json and loss curve to {args.output_dir}")
    if d.enabled:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return results
