"""The fine-tuning loop behind ``llmopt-finetune``, in four steps with one job each:

1. :func:`resolve_options` / :func:`prepare_data`: the run's options (a copy of the CLI's, with
   the defaults that depend on the data and the optimizer filled in) and its train/eval split;
2. :func:`build_model`: the base model, its tokenizer and the LoRA adapters;
3. :func:`train_loop`: the steps, each one :func:`llmopt_ext.optim.drive_step` call (how an
   optimizer is driven is declared by its class: :mod:`llmopt_ext.optim.driver`), with
   checkpoints;
4. :func:`write_outputs`: evaluation after training, adapter, results.json, loss curve, merge.

:func:`run` chains them. Optimizer names are known only to :mod:`.optimizers`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

from ..optim import driver
from . import data as D
from .checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint, trainable
from .evaluate import eval_loss, evaluate, greedy_generate
from .optimizers import (OPTIMIZERS, UsageError, build_optimizer, check_optimizer_options,
                         make_scheduler, optimizer_class)

__all__ = ["run", "OPTIMIZERS", "UsageError", "Interrupted", "make_optimizer"]


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


def init_distributed(device_arg: str, timeout_s: float = 600.0) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then gloo on CPU, NCCL on CUDA. ``timeout_s``
    (``--ddp-timeout``) bounds every collective: without it a stalled rank hangs the others for
    gloo's default of 30 minutes."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return Dist()
    import datetime
    import torch.distributed as dist
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
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
    tokenizer = _load_tokenizer(AutoTokenizer, path)
    kwargs: dict = {}
    if driver.uses_hvp(optimizer_class(args.optimizer)):
        # Hessian-vector products need double backward, which SDPA's fused CPU/CUDA
        # attention kernels do not have
        kwargs["attn_implementation"] = "eager"
    if args.load_in_4bit:
        from .qlora import quantization_kwargs
        kwargs.update(quantization_kwargs(device, args.precision))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, _safetensor_error()) as e:  # not OOM / CUDA faults
        raise UsageError(f"--model {path}: the model could not be loaded ({type(e).__name__}: "
                         f"{_first_line(e)}); are the weights complete and config.json valid?") from None
    if not args.load_in_4bit:
        model.to(device)
    else:
        from .qlora import keep_trainable_layout
        keep_trainable_layout(model)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _safetensor_error() -> type:
    from safetensors import SafetensorError
    return SafetensorError


def _load_tokenizer(auto, path: str):
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UsageError(f"--model {path}: no tokenizer there (none of {', '.join(TOKENIZER_FILES)}); "
                         "save it next to the weights with tokenizer.save_pretrained(dir)")
    try:
        return auto.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--model {path}: the tokenizer could not be loaded ({type(e).__name__}: "
                         f"{_first_line(e)})") from None


def lora_config(args):
    """The LoraConfig the options ask for (peft's own layer; add_lora may swap in the fused one)."""
    from peft import LoraConfig

    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if args.target_modules == "all-linear":
        targets = "all-linear"
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      use_rslora=args.rslora, target_modules=targets, task_type="CAUSAL_LM")


def add_lora(model, args):
    from peft import get_peft_model

    cfg = lora_config(args)
    if args.load_in_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if args.fused:
        from ..nn import use_fused_lora
        cfg = use_fused_lora(cfg)
    return get_peft_model(model, cfg)



# ------------------------------------------------------------------------------- options, data

def check_options(args) -> None:
    if args.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {args.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    check_optimizer_options(args)
    if args.aisarah_anchor < 0:
        raise UsageError("--aisarah-anchor must be >= 0")
    if args.eval_every < 0:
        raise UsageError("--eval-every must be >= 0 (0: no evaluation during training)")
    for k in ("max_steps", "batch_size", "grad_accum", "lora_r", "max_length"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise UsageError("--lora-dropout must be in [0, 1)")


def default_template(model: str | None) -> str:
    """compact for the embedded model; for a --model, its own chat template when its tokenizer
    has one (an instruct model trained in a format it never saw starts far higher: SmolLM2-135M-
    Instruct, eval loss 4.88 in the Alpaca template), else alpaca."""
    if not model:
        return "compact"
    return "chat" if os.path.isdir(model) and D.checkpoint_has_chat_template(model) else "alpaca"


def resolve_options(args) -> argparse.Namespace:
    """A checked copy of the CLI options with the defaults that depend on other options filled
    in (``args`` itself is not changed); the notes say what was changed and why."""
    check_options(args)
    opts = argparse.Namespace(**vars(args))
    opts.notes = []
    opts.template = args.template or default_template(args.model)
    if driver.deterministic_closure(optimizer_class(args.optimizer)) and args.lora_dropout > 0:
        opts.notes.append(f"{args.optimizer} re-evaluates its closure, which must be "
                          "deterministic: LoRA dropout set to 0")
        opts.lora_dropout = 0.0
    return opts


RUN_OUTPUTS = ("results.json", "adapter", "checkpoint")


def check_output_dir(opts) -> None:
    """Refuses an --output-dir that holds a previous run, unless --overwrite is given or the
    command resumes from that directory's own checkpoint."""
    out = opts.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output-dir {out}: exists and is not a directory")
    found = [n for n in RUN_OUTPUTS if os.path.exists(os.path.join(out, n))]
    if not found or opts.overwrite:
        return
    own = os.path.realpath(os.path.join(out, "checkpoint"))
    if opts.resume and os.path.realpath(opts.resume) == own:
        return
    raise UsageError(f"--output-dir {out} holds a previous run ({', '.join(found)}); pass "
                     f"--overwrite to replace it, --resume {os.path.join(out, 'checkpoint')} to "
                     "continue it, or choose another --output-dir")


# Options that may differ between a run and its resumption (listed in --help). Every other
# option must be equal: the checkpoint's state is only meaningful for the same model, adapter,
# data, optimizer and batch stream. --max-steps re-lays the cosine schedule over the new total.
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "save_every", "output_dir", "resume", "overwrite", "eval", "em_samples",
    "max_new_tokens", "generate", "generate_input", "merge", "threads", "progress", "device",
    "ddp_timeout", "notes", "max_seconds", "eval_every", "config", "plan"})


def run_config(opts, opt, world_size: int) -> dict:
    """What a checkpoint must agree with: the options outside :data:`RESUME_MAY_CHANGE`,
    with paths made absolute and the learning rate the optimizer was built with."""
    cfg = {k: v for k, v in vars(opts).items()
           if k not in RESUME_MAY_CHANGE and not callable(v)}
    for k in ("model", "data"):
        if cfg.get(k):
            cfg[k] = os.path.abspath(cfg[k])
    cfg["lr"] = opt.param_groups[0].get("initial_lr", opt.param_groups[0].get("lr"))
    cfg["world_size"] = world_size
    return cfg


@dataclass
class Split:
    train: list[dict]
    eval: list[dict]


def prepare_data(opts) -> Split:
    """The train/eval records: a seeded 10% split (capped at --eval-size) of --data, or the
    embedded generated task with a held-out set drawn from another seed stream."""
    if opts.data:
        records = D.load_alpaca(opts.data)
        order = list(range(len(records)))
        random.Random(opts.seed).shuffle(order)
        n_eval = min(opts.eval_size, max(1, len(records) // 10)) if len(records) > 1 else 0
        train = [records[i] for i in order[n_eval:]] or records
        return Split(train, [records[i] for i in order[:n_eval]])
    return Split(D.generate_dataset(opts.train_size, seed=opts.seed),
                 D.generate_dataset(opts.eval_size, seed=opts.seed + 1_000_003))


# ------------------------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything the loop and the outputs share."""
    opts: argparse.Namespace
    dist: Dist
    device: torch.device
    model: object
    tokenizer: object
    split: Split
    train_ex: list[dict]
    eval_ex: list[dict]
    results: dict = field(default_factory=dict)
    data_stats: dict = field(default_factory=dict)  # --max-length truncations / drops

    @property
    def pad(self) -> int:
        return D.pad_id(self.tokenizer)


def build_model(opts, dist: Dist, device: torch.device, split: Split) -> Run:
    model, tokenizer = load_model(opts, device)
    stats: dict = {"train": {}, "eval": {}}
    train_ex = D.encode_dataset(tokenizer, split.train, opts.template, opts.max_length,
                                what=opts.data or "embedded dataset", stats=stats["train"])
    eval_ex = D.encode_dataset(tokenizer, split.eval, opts.template, opts.max_length,
                               what="eval split", stats=stats["eval"]) if split.eval else []
    for part, st in stats.items():
        if st.get("truncated") or st.get("dropped"):
            log(f"note: --max-length {opts.max_length}: {st['truncated']} {part} examples "
                f"truncated, {st['dropped']} dropped (no response token left)", dist.rank)
    model = add_lora(model, opts)
    n_train = sum(p.numel() for p in trainable(model).values())
    n_all = sum(p.numel() for p in model.parameters())
    log(f"model {opts.model or 'embedded base'}: {n_all:,} parameters, {n_train:,} trainable "
        f"(LoRA r={opts.lora_r}, {'fused' if opts.fused else 'peft'} layer); "
        f"{len(train_ex)} train / {len(eval_ex)} eval examples; device {device}, "
        f"precision {opts.precision}, optimizer {opts.optimizer}", dist.rank)
    return Run(opts, dist, device, model, tokenizer, split, train_ex, eval_ex, data_stats=stats)


def make_optimizer(name: str, params: list, opts, total_steps: int):
    """The optimizer ``--optimizer name`` builds from the options (see :mod:`.optimizers`)."""
    return build_optimizer(name, params, opts, total_steps)


def autocast(opts, device: torch.device):
    if opts.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if opts.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class Stepper:
    """One optimizer step over ``grad_accum`` micro-batches: the batches' loss functions and
    the step context, handed to :func:`llmopt_ext.optim.drive_step`."""

    def __init__(self, r: Run, fwd, opt, scaler):
        self.r, self.fwd, self.opt, self.scaler = r, fwd, opt, scaler
        self._anchor: list[D.Batch] | None = None  # built when an optimizer first asks for it

    def full_loss(self):
        if self._anchor is None:
            self._anchor = anchor_batches(self.r)
        return (self.loss_of(b) for b in self._anchor)

    def loss_of(self, b: D.Batch) -> torch.Tensor:
        with autocast(self.r.opts, self.r.device):
            out = self.fwd(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
        return out.loss.float()

    def logits_of(self, b: D.Batch):
        with autocast(self.r.opts, self.r.device):
            logits = self.fwd(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        return logits, b.labels == D.IGNORE_INDEX

    def __call__(self, batches: list[D.Batch]) -> float:
        ctx = driver.StepContext(
            n_tokens=sum(int((b.labels != D.IGNORE_INDEX).sum()) for b in batches),
            logits=lambda: self.logits_of(batches[0]),
            full_loss=self.full_loss if self.r.opts.aisarah_anchor > 0 else None)
        loss = driver.drive_step(self.opt, [lambda b=b: self.loss_of(b) for b in batches],
                                 scaler=self.scaler, max_grad_norm=self.r.opts.max_grad_norm, ctx=ctx)
        return float(loss)


def anchor_batches(r: Run) -> list[D.Batch]:
    """A stand-in for the full-data gradient (AI-SARAH's outer loop, through
    ``StepContext.full_loss``): ``--aisarah-anchor`` training examples drawn once (seeded), this
    rank's share, in batches of ``--batch-size``. A mini-batch gradient as the outer-loop start
    carries its noise through every inner step. Embedded task, 300 steps, batch 16: AI-SARAH's
    eval loss 1.50 with the mini-batch start, 1.35 with a 256-example anchor. Restarting more
    often (max_inner 25 or 100 instead of 1000) changed the training loss by < 10%: what limits
    AI-SARAH here is its direction, a variance-reduced raw gradient (SGD-like, no per-coordinate
    scaling), at the ~1e-2 step its curvature rule picks."""
    o, d = r.opts, r.dist
    g = torch.Generator().manual_seed(o.seed * 1000003 + 7)
    picked = torch.randperm(len(r.train_ex), generator=g)[:o.aisarah_anchor].tolist()
    mine = picked[d.rank::d.world_size]
    return [D.collate([r.train_ex[i] for i in mine[j:j + o.batch_size]], r.pad).to(r.device)
            for j in range(0, len(mine), o.batch_size)]


class Interrupted(Exception):
    """The run stopped on SIGINT/SIGTERM after saving; the CLI exits with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """SIGINT / SIGTERM during training ask the loop to stop after the current step (which
    then saves); a second signal gets the handler that was there before (Ctrl-C twice aborts
    at once). Outside the main thread signals cannot be caught, so it does nothing there."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, raise_now: bool = False):
        self.signum: int | None = None
        self.raise_now = raise_now  # raise Interrupted in the handler: for code with no steps
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        import threading
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()
        if self.raise_now:
            raise Interrupted(signum)
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save the adapter, "
              "a checkpoint and results.json (send it again to abort without saving)",
              file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def agreed(self, d: Dist) -> int | None:
        """The signal to stop on, the same on every rank (a signal reaches the ranks at
        slightly different steps; one stopping alone would leave the others in a collective)."""
        if not d.enabled:
            return self.signum
        import torch.distributed as dist
        flag = torch.tensor([self.signum or 0], dtype=torch.long)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) or None


@dataclass
class Trainer:
    opt: object
    sched: object
    scaler: object
    stream: D.BatchStream
    stepper: Stepper
    config: dict
    start: int = 0
    history: list = field(default_factory=list)
    stop: StopRequest = field(default_factory=StopRequest)
    step: int = 0          # steps done so far (where a checkpoint taken now would resume)
    interrupted: int | None = None


def setup_training(r: Run) -> Trainer:
    o, d = r.opts, r.dist
    params = list(trainable(r.model).values())
    opt = make_optimizer(o.optimizer, params, o, o.max_steps)
    config = run_config(o, opt, d.world_size)  # before the scheduler rescales the lr
    sched = make_scheduler(opt, o)
    scaler = torch.amp.GradScaler(r.device.type) if o.precision == "fp16" else None
    fwd = r.model
    if d.enabled and not driver.uses_hvp(opt):
        # HVP optimizers average gradients (and HVPs) themselves and need the local graph,
        # so they must NOT be wrapped (their docstrings)
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(r.model, device_ids=[r.device.index] if r.device.type == "cuda" else None)
    stream = D.BatchStream(r.train_ex, o.batch_size, r.pad, o.seed, d.rank, d.world_size)
    t = Trainer(opt, sched, scaler, stream, Stepper(r, fwd, opt, scaler), config)
    if o.resume:
        t.start, t.history, extra = load_checkpoint(o.resume, r.model, opt, scaler, stream,
                                                    config=config)
        if t.start > o.max_steps:
            raise UsageError(f"--resume {o.resume}: the checkpoint is at step {t.start}, past "
                             f"--max-steps {o.max_steps}; pass --max-steps {t.start} or more")
        if sched is not None and extra.get("sched"):
            sched.load_state_dict(extra["sched"])
        log(f"resumed from {o.resume} at step {t.start}", d.rank)
    t.step = t.start
    return t


def _checkpoint(r: Run, t: Trainer, step: int) -> None:
    save_checkpoint(os.path.join(r.opts.output_dir, "checkpoint"), r.model, t.opt, t.scaler,
                    t.stream, step, t.history, {"sched": t.sched.state_dict() if t.sched else None},
                    config=t.config)


def _step_failed(o, d: Dist, step: int, e: Exception) -> RuntimeError:
    """The error for a failed step: names the step, the rank under DDP, and the timeout when a
    collective timed out (another rank stalled or died)."""
    where = f"rank {d.rank} of {d.world_size}: " if d.enabled else ""
    msg = f"{where}{o.optimizer} step {step + 1} failed: {type(e).__name__}: {e}"
    low = str(e).lower()
    if d.enabled and ("timed out" in low or "timeout" in low):
        msg += (f"\n(no reply from another rank within --ddp-timeout {o.ddp_timeout:g} s: a "
                "rank stalled or died; its own log says why)")
    return RuntimeError(msg)


def train_loop(r: Run, t: Trainer) -> dict:
    """The steps from ``t.start`` to --max-steps (or to a SIGINT/SIGTERM, which stops after the
    current step: ``t.interrupted``); returns the run's training summary."""
    o, d = r.opts, r.dist
    # a closure re-evaluated at trial points must be deterministic: no dropout anywhere
    r.model.train(not driver.deterministic_closure(t.opt))
    driver.set_mode(t.opt, True)
    from tqdm.auto import tqdm
    from ..nn import fallback_counts, reset_fallback_counts
    bar = tqdm(total=o.max_steps, initial=t.start, disable=d.rank != 0 or not o.progress,
               desc=f"finetune {o.optimizer}", dynamic_ncols=True)
    reset_fallback_counts()
    t0, tokens = time.perf_counter(), 0
    for step in range(t.start, o.max_steps):
        if o.max_seconds and time.perf_counter() - t0 >= o.max_seconds:
            log(f"--max-seconds {o.max_seconds:g}: stopping after {t.step - t.start} steps", d.rank)
            break
        batches = [t.stream.next().to(r.device) for _ in range(o.grad_accum)]
        try:
            loss = t.stepper(batches)
            if t.sched is not None:
                t.sched.step()
            stop = t.stop.agreed(d)
        except Exception as e:  # name the step: optimizer failures are otherwise context-free
            raise _step_failed(o, d, step, e) from e
        if not math.isfinite(loss):
            log(f"warning: non-finite loss {loss} at step {step}", d.rank)
        tokens += sum(b.n_tokens for b in batches) * d.world_size
        t.history.append((step + 1, loss))
        t.step = step + 1
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        bar.update(1)
        if o.eval_every and (step + 1) % o.eval_every == 0 and d.rank == 0 and r.eval_ex:
            _eval_during_training(r, step + 1, bar)
        if step + 1 - t.start == min(3, o.max_steps - t.start):  # a time estimate from real steps
            sps = (time.perf_counter() - t0) / (step + 1 - t.start)
            log(f"time: {sps:.3f} s/step over the first {step + 1 - t.start} steps -> "
                f"~{sps * (o.max_steps - t.start):.0f} s for {o.max_steps - t.start} steps", d.rank)
        if stop:
            t.interrupted = stop
            break
        if o.save_every and (step + 1) % o.save_every == 0 and step + 1 < o.max_steps and d.rank == 0:
            _checkpoint(r, t, step + 1)
    bar.close()
    driver.set_mode(t.opt, False)  # evaluation and the saved adapter use the eval weights
    return _summary(r, t, time.perf_counter() - t0, tokens, fallback_counts())


def _summary(r: Run, t: Trainer, seconds: float, tokens: int, fallbacks: dict) -> dict:
    o, d = r.opts, r.dist
    done = t.step - t.start
    summary = {"steps": done, "seconds": seconds, "steps_per_s": done / max(seconds, 1e-9),
               "tokens_per_s": tokens / max(seconds, 1e-9), "start_step": t.start,
               "end_step": t.step, "skipped_steps": driver.skipped_steps(t.opt),
               "final_loss": t.history[-1][1] if t.history else None, "history": t.history}
    if t.interrupted:
        summary["interrupted"] = signal.Signals(t.interrupted).name
    if o.fused:  # forwards of the fused layer that ran peft's code instead (reason -> count)
        summary["fused_fallbacks"] = fallbacks
    if d.enabled:  # ranks must agree: the optimizers keep parameters identical
        summary["max_rank_param_diff"] = _rank_param_diff(list(trainable(r.model).values()))
    return summary


def _eval_during_training(r: Run, step: int, bar) -> None:
    """--eval-every: the eval loss now, in results' ``eval_history`` [(step, loss)]."""
    was_training = r.model.training
    loss = eval_loss(r.model, r.eval_ex, r.pad, r.device)
    r.model.train(was_training)
    r.results.setdefault("eval_history", []).append((step, loss))
    bar.write(f"step {step}: eval loss {loss:.4f}")


def _rank_param_diff(params: list[torch.Tensor]) -> float:
    import torch.distributed as dist
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    return float((flat - ref).abs().max())


# ------------------------------------------------------------------------------- outputs

def plot_loss(history: list, path: str, eval_history: list = ()) -> str | None:
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
    if eval_history:
        ax.plot([h[0] for h in eval_history], [h[1] for h in eval_history], "o-", lw=1.2,
                ms=3, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None



def _evaluate(r: Run, when: str) -> None:
    if not (r.eval_ex and r.opts.eval and r.dist.rank == 0):
        return
    res = r.results[when] = evaluate(r.model, r.tokenizer, r.opts, r.split.eval, r.eval_ex, r.device)
    hist = r.results.get("train", {}).get("history") or [(0, None)]
    steps = f" {hist[-1][0]} steps" if when == "after" else ""
    log(f"{when}{steps}: eval loss {res['eval_loss']:.4f}, exact match {res['exact_match']:.3f}"
        + (f" {res['exact_match_by_task']}" if when == "after" else ""))


def write_outputs(r: Run, history: list, partial: bool = False) -> None:
    """Rank 0: adapter, tokenizer, options, loss curve, optional sample and merge,
    results.json (written atomically); the final message names what was written, nothing
    else. ``partial`` (an interrupted run): no sample and no merge."""
    from .cli import build_parser
    from .config import CONFIG_NAME, save_config

    o, out = r.opts, r.opts.output_dir
    os.makedirs(out, exist_ok=True)
    r.model.save_pretrained(os.path.join(out, "adapter"))
    r.tokenizer.save_pretrained(os.path.join(out, "adapter"))
    written = ["adapter/"]
    save_config(o, build_parser(), os.path.join(out, CONFIG_NAME))
    written.append(CONFIG_NAME)
    note = plot_loss(history, os.path.join(out, "loss_curve.png"), r.results.get("eval_history", ()))
    if note:
        r.results.setdefault("notes", []).append(note)
        log(f"note: {note}")
    else:
        written.append("loss_curve.png")
    if o.generate and not partial:
        ids = D.prompt_ids(r.tokenizer, {"instruction": o.generate, "input": o.generate_input,
                                         "output": ""}, o.template)
        gen = greedy_generate(r.model, r.tokenizer, [ids], r.device, o.max_new_tokens * 4)[0]
        r.results["generation"] = r.tokenizer.decode(gen, skip_special_tokens=True)
        log(f"--generate {o.generate!r} -> {r.results['generation']!r}")
    if o.merge and not partial:
        if o.load_in_4bit:  # a 16-bit export: merging into NF4 would re-quantize the delta away
            from .qlora import merge_dequantized
            merged = merge_dequantized(r.model, o.model or base_model_dir())
        else:
            merged = r.model.merge_and_unload()
        merged.save_pretrained(os.path.join(out, "merged"))
        r.tokenizer.save_pretrained(os.path.join(out, "merged"))
        written.append("merged/")
    atomic_write_bytes(os.path.join(out, "results.json"),
                       json.dumps(r.results, indent=1, default=str).encode())
    written.append("results.json")
    log(f"saved {', '.join(written)} in {out}")


def _finish_interrupted(r: Run, t: Trainer) -> None:
    """Rank 0 after SIGINT/SIGTERM: a checkpoint at the last finished step, the adapter and a
    results.json marked interrupted (no evaluation: the user asked to stop)."""
    name = signal.Signals(t.interrupted).name
    r.results["interrupted"] = name
    if r.dist.rank == 0:
        _checkpoint(r, t, t.step)
        write_outputs(r, t.history, partial=True)
        ck = os.path.join(r.opts.output_dir, "checkpoint")
        log(f"{name}: stopped at step {t.step} of {r.opts.max_steps}; continue with --resume {ck}")


def _record_memory(r: Run, mplan: dict, mem) -> None:
    """The plan beside the measured peak in results.json (and the log)."""
    planned, peak = mplan["modes"][mplan["chosen"]]["total"], mem.peak()
    r.results["memory"] = {
        "plan": mplan, "planned_bytes": planned, "measured_peak_bytes": peak,
        "measured": f"VmHWM {mem.window} through training and the final evaluation (the "
                    "whole process: interpreter and libraries included)",
        "process_baseline_bytes": mem.start}
    if peak:
        log(f"memory: peak {peak / 2**20:,.1f} MiB resident, planned {planned / 2**20:,.1f} MiB "
            f"({planned / peak - 1:+.0%})", r.dist.rank)


def _close_distributed(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def run(args) -> dict:
    """Fine-tunes, evaluates and saves as the options say; returns the results dict (also
    written to ``<output-dir>/results.json`` by rank 0). Raises :class:`Interrupted` after
    saving when SIGINT/SIGTERM stopped the training."""
    opts = resolve_options(args)
    if opts.ddp_timeout <= 0:
        raise UsageError("--ddp-timeout must be > 0 seconds")
    check_output_dir(opts)
    d = init_distributed(opts.device, opts.ddp_timeout)
    device = resolve_device(opts.device, d)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    for note in opts.notes:
        log(f"note: {note}", d.rank)
    split = prepare_data(opts)  # a bad data file fails before the model loads
    from . import plan as P
    P.warm_start(opts.model or base_model_dir())
    mem = P.PeakMemory()  # the process baseline: resident size before the model loads
    r = build_model(opts, d, device, split)
    mem.after_load(r.model)
    mem.reset()  # the peak from here on, not the transients of loading the checkpoint
    r.results["options"] = {k: v for k, v in vars(opts).items() if not callable(v)}
    r.results["data"] = r.data_stats
    _evaluate(r, "before")
    with StopRequest() as stop:
        t = setup_training(r)
        t.stop = stop
        mplan = P.memory_plan(opts, P.model_shape(opts.model or base_model_dir(), opts),
                              P.longest(r.train_ex), mem.measured_parts(),
                              P.eval_shape_of(opts, r.eval_ex))
        log(P.format_plan(mplan, short=True), d.rank)
        r.results["train"] = train_loop(r, t)
    if not t.interrupted and d.rank == 0:
        try:  # a signal during the final evaluation (minutes on a real model) still saves
            with StopRequest(raise_now=True):
                _evaluate(r, "after")
        except Interrupted as e:
            t.interrupted = e.signum
            r.results["train"]["interrupted"] = signal.Signals(e.signum).name
    _record_memory(r, mplan, mem)
    if t.interrupted:
        _finish_interrupted(r, t)
        _close_distributed(d)
        raise Interrupted(t.interrupted)
    if d.rank == 0:
        write_outputs(r, t.history)
    _close_distributed(d)
    return r.results
