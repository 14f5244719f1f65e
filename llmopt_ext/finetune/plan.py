"""A memory and time plan for a fine-tuning run (``llmopt-finetune --plan``; a short version is
printed at the start of every run, and results.json gets the plan beside the measured peak).

The plan is the process's resident peak, in parts (LoRA on the fp32 base, QLoRA on an NF4 base,
full fine-tuning):

* process baseline (measured): the resident size before the model loads -- interpreter, torch,
  transformers, peft (519 MiB on this project's CPU machine: 296 MiB of it is importing
  transformers/peft and the model's classes). It dominates a small model's peak;
* loaded with the model (measured): anonymous memory that loading the tokenizer, encoding the
  data and building the model added beyond the parameters (SmolLM2-135M: 43 MiB with 16
  training examples, 50 MiB with the 4000 of the embedded task: its 49k-token tokenizer and
  the encoded examples; the embedded model: 4 MiB);
* checkpoint mapped (measured): a memory-mapped checkpoint file beyond the parameters still in
  it (0 for LoRA; QLoRA, below);
* frozen weights: the base's parameters in their storage (fp32; NF4 for QLoRA's linear layers:
  4 bits + double-quantized absmax, 8 bits per 64-weight block + fp32 per 256 blocks). A
  safetensors checkpoint stays memory-mapped: these pages are resident once the first forward
  has read them;
* trainable parameters, their gradients (same dtype), and the optimizer state: bytes per
  trainable element probed from the optimizer class itself (:func:`state_bytes`: one
  :func:`llmopt_ext.optim.drive_step` on a small tensor, state tensors counted), no table;
* activations: what a decoder layer saves for backward (:func:`activation_bytes`), times
  :data:`HVP_FACTOR` for optimizers that take Hessian-vector products (``uses_hvp``), plus the
  logits' loss tensors and, under bf16/fp16 autocast, the cast copies of the linear weights that
  backward keeps;
* eval logits: the evaluation's largest transient (:func:`eval_bytes`: three fp32 vocab-sized
  tensors per token of an eval-loss batch). Training and evaluation do not overlap: the total
  counts the larger of activations and eval logits.

What it leaves out: the allocator keeping freed memory (glibc holds the first steps' blocks;
part of the measured peak, not modelled: see :data:`HVP_FACTOR`), transients while the
checkpoint loads (the measured window starts after it), the output stage (adapter, loss curve:
matplotlib adds ~25 MiB after the measured window).

QLoRA on CPU: the fp32 checkpoint stays mapped for the parameters left unquantized, and the
pages quantizing read stay resident (SmolLM2-135M: RssFile +514 MiB). The plan counts the mapping
beyond those parameters as measured (:func:`mapped_checkpoint_extra`, 405 MiB there); without
it the QLoRA AdamW plan was 37% under the measured peak, with it 5% (1514 vs 1590 MiB).

Measured on CPU (shared cores; 3 steps, batch 2, ``--eval-size 4
--em-samples 2 --max-new-tokens 4``), plan vs VmHWM: see README.md ("Plan:").

Time: seconds per step measured over a few steps (``--plan`` runs them; a run logs it after its
first steps).

The measured side (:class:`PeakMemory`) is the process's resident peak (``VmHWM`` in
/proc/self/status; tracemalloc does not see torch's allocations) from the end of model loading
through training and the final evaluation: an absolute number, the memory the run needs.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch

from ..optim import driver

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # per weight: nibble + uint8 absmax/64 + fp32 per 256 blocks
PROBE_SHAPE = (256, 256)
EXACT_PROBE_MAX = 1 << 20  # trainable tensors up to this size are probed at their own shape
# Peak of a step that takes a Hessian-vector product, over activation_bytes (the plain step's).
# The create_graph backward keeps its own saved tensors beside the forward's (distinct storages
# through saved_tensors_hooks: 2.63x the forward's on SmolLM2-135M, 2.78x on the embedded model,
# batch 2), and the second backward runs through that bigger graph. Measured resident rise of
# the first step over the RSS before it, minus the optimizer state it allocates, over
# activation_bytes: SophiaH 4.0x (757 of 785 MiB over 189) on SmolLM2-135M, 3.3x on the
# embedded model; AdaHessian 3.7x on SmolLM2-135M (LoRA r=8, 2 x 51 tokens, eager attention).
# That is resident memory, glibc's caching of freed blocks included: with a fixed mmap
# threshold (MALLOC_MMAP_THRESHOLD_=131072, freed blocks go back at once) the SophiaH run above
# peaks at 1526 MiB (the plan, 1852, 21% over it; 1898-1980 MiB without), and the embedded AdaHessian run at batch 16 x 101 at 739 MiB
# instead of 937 (the plan, 783, is then 6% over it instead of 16% under).
HVP_FACTOR = 4.0
EVAL_LOSS_BATCH = 32  # evaluate.eval_loss's batch size


# --------------------------------------------------------------------------- optimizer state

def _probe_state_bytes(name: str, opts, shape: tuple[int, ...]) -> int:
    """Bytes of optimizer state for one fp32 parameter of ``shape`` after one step."""
    from .optimizers import build_optimizer
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.1)
    rows = shape[-1] if len(shape) > 1 else shape[0]
    x = torch.randn(8, rows, generator=g)
    o = copy.copy(opts)
    o.lr = None if driver.lr_free(_cls(name)) else (opts.lr or 1e-3)
    opt = build_optimizer(name, [p], o, total_steps=10)

    def out():
        return x @ (p.t() if p.dim() > 1 else p.unsqueeze(1))

    ctx = driver.StepContext(n_tokens=8, logits=lambda: (out().unsqueeze(0), None),
                             full_loss=lambda: (out() ** 2).mean())
    driver.drive_step(opt, [lambda: (out() ** 2).mean()], ctx=ctx)
    return sum(_nbytes(v) for st in opt.state.values() for v in st.values())


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x) for x in v)
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    return 0


def _cls(name: str) -> type:
    from .optimizers import optimizer_class
    return optimizer_class(name)


def state_bytes_per_param(name: str, opts) -> float:
    """Optimizer state bytes per trainable element, probed once on a 256x256 fp32 matrix and
    kept as the class attribute ``state_bytes_per_param`` (a class may declare its own).
    Exact for element-wise optimizers (AdamW: 8); an average for low-rank ones (GoLore)."""
    cls = _cls(name)
    v = getattr(cls, "state_bytes_per_param", None)
    if v is None:
        v = _probe_state_bytes(name, opts, PROBE_SHAPE) / (PROBE_SHAPE[0] * PROBE_SHAPE[1])
        cls.state_bytes_per_param = v
    return float(v)


def state_bytes(name: str, opts, shapes: dict[tuple, int]) -> float:
    """State bytes for trainable tensors {shape: count}: probed at each shape up to 2^20
    elements (GoLore's projectors depend on the shape), per element above."""
    total = 0.0
    for shape, count in shapes.items():
        n = 1
        for s in shape:
            n *= s
        if n <= EXACT_PROBE_MAX:
            total += count * _probe_state_bytes(name, opts, shape)
        else:
            total += count * n * state_bytes_per_param(name, opts)
    return total


# --------------------------------------------------------------------------- model shapes

@dataclass
class Shape:
    params: int             # every parameter of the base
    linear: int             # weights of the decoder's nn.Linear layers (quantized by QLoRA)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    lora: dict              # LoRA tensor shape -> count
    full: dict              # every base parameter's shape -> count


def _shapes(tensors) -> dict:
    out: dict = {}
    for t in tensors:
        out[tuple(t.shape)] = out.get(tuple(t.shape), 0) + 1
    return out


def model_shape(model_dir: str, opts) -> Shape:
    """Counts from the model's config on the meta device (nothing is allocated)."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from .train import lora_config
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    full = _shapes(model.parameters())
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not head)
    with torch.device("meta"):
        pm = get_peft_model(model, lora_config(opts))
    lora = _shapes(p for n, p in pm.named_parameters() if "lora_" in n)
    heads = getattr(cfg, "num_attention_heads", 1)
    return Shape(params, linear, cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
                 cfg.num_hidden_layers, heads, cfg.vocab_size, lora, full)


# --------------------------------------------------------------------------- the plan

def activation_bytes(s: Shape, batch: int, seq: int, elem: int, eager: bool) -> float:
    """Bytes a Llama-style decoder saves for backward over one micro-batch: per layer 8
    hidden-sized tensors (two RMSNorm inputs and outputs, q, k, v, the o_proj input) and 4
    intermediate-sized ones (gate, up, SiLU(gate), the down_proj input), the attention
    probabilities (heads x seq^2) with eager attention; then the final norm and the loss's
    three vocab-sized fp32 tensors (log-softmax output, its gradient, the logits' gradient)."""
    tokens = batch * seq
    per_layer = tokens * (8 * s.hidden + 4 * s.intermediate) * elem
    if eager:
        per_layer += batch * s.heads * seq * seq * 4  # softmax in fp32
    return s.layers * per_layer + tokens * (2 * s.hidden * elem + 3 * s.vocab * 4)


def eval_bytes(s: Shape, batch: int, seq: int) -> float:
    """The eval loss's transient (:func:`llmopt_ext.finetune.evaluate.eval_loss`, no grad): for
    a batch of ``batch`` x ``seq`` tokens three fp32 vocab-sized tensors per token (the logits,
    the shifted copy, log-softmax inside cross_entropy). SmolLM2-135M, 4 x 51 tokens: 38 MiB
    each, 112 MiB measured above the RSS after the evaluation (115 planned). Greedy generation
    keeps the last position's logits and a KV cache (layers x 2 x tokens x kv heads x head dim
    x 4 bytes: 30 x 2 x ~100 x 3 x 64 x 4 = 4.4 MiB for 2 prompts of ~50 tokens), not counted."""
    return 3 * batch * seq * s.vocab * 4


def _count(shapes: dict) -> int:
    n = 0
    for shape, c in shapes.items():
        k = 1
        for d in shape:
            k *= d
        n += k * c
    return n


MEASURED = ("process_baseline", "loaded_other", "checkpoint_mapped")


def memory_plan(opts, s: Shape, seq: int, measured: dict | None = None,
                eval_shape: tuple[int, int] | None = None) -> dict:
    """Bytes per mode ("lora", "qlora", "full") for ``opts``'s optimizer, batch and precision
    at micro-batches of ``seq`` tokens; ``chosen`` names the run's mode. ``measured``: the
    process baseline and what loading added (:meth:`PeakMemory.measured_parts`; 0 when not
    given); ``eval_shape``: (examples, longest) of the eval set when the run evaluates. The
    total is the parts with the larger of activations and eval logits (they never coexist)."""
    cls = _cls(opts.optimizer)
    hvp = bool(driver.uses_hvp(cls))
    elem = 4 if opts.precision == "fp32" else 2
    act = activation_bytes(s, opts.batch_size, seq, elem, eager=hvp) * (HVP_FACTOR if hvp else 1)
    if opts.precision != "fp32":
        act += s.linear * 2 + s.vocab * s.hidden * 2  # autocast's weight copies saved for backward
    ev = eval_bytes(s, min(eval_shape[0], EVAL_LOSS_BATCH), eval_shape[1]) if eval_shape else 0
    base = {k: int((measured or {}).get(k, 0)) for k in MEASURED}
    modes = {}
    for mode, frozen, train in (("lora", 4 * s.params, s.lora),
                                ("qlora", NF4_BYTES * s.linear + 4 * (s.params - s.linear), s.lora),
                                ("full", 0, s.full)):
        n_train = _count(train)
        parts = {**base, "frozen_weights": frozen, "trainable": 4 * n_train,
                 "gradients": 4 * n_train,
                 "optimizer_state": state_bytes(opts.optimizer, opts, train),
                 "activations": act, "eval_logits": ev}
        total = sum(v for k, v in parts.items() if k not in ("activations", "eval_logits"))
        modes[mode] = {**{k: int(v) for k, v in parts.items()}, "total": int(total + max(act, ev))}
    return {"chosen": "qlora" if opts.load_in_4bit else "lora", "optimizer": opts.optimizer,
            "uses_hvp": hvp, "hvp_factor": HVP_FACTOR if hvp else 1.0, "seq_len": seq,
            "batch_size": opts.batch_size, "precision": opts.precision,
            "eval_shape": list(eval_shape) if eval_shape else None, "modes": modes}


def _mb(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


ROWS = (  # key, what the row counts
    ("process_baseline", "measured: RSS before the model loads (python, torch, libraries)"),
    ("loaded_other", "measured: tokenizer, encoded data, model objects"),
    ("checkpoint_mapped", "measured: mapped checkpoint beyond its parameters (4-bit)"),
    ("frozen_weights", "base parameters (fp32; NF4 linears for qlora)"),
    ("trainable", "trainable parameters (fp32)"),
    ("gradients", "their gradients"),
    ("optimizer_state", "probed from the optimizer class"),
    ("activations", "one step: saved for backward + loss tensors"),
    ("eval_logits", "eval loss: 3 fp32 vocab-sized tensors per token"),
    ("total", "all rows, with the larger of activations / eval_logits"),
)


def format_plan(plan: dict, short: bool = False) -> str:
    if short:
        m = plan["modes"][plan["chosen"]]
        return (f"memory plan ({plan['chosen']}, {plan['optimizer']}, batch {plan['batch_size']} x "
                f"{plan['seq_len']} tokens): {_mb(m['total'])} = process {_mb(m['process_baseline'])}"
                f" + loaded {_mb(m['loaded_other'] + m['checkpoint_mapped'])}"
                f" + weights {_mb(m['frozen_weights'])}"
                f" + trainable/grads/state {_mb(m['trainable'] + m['gradients'] + m['optimizer_state'])}"
                f" + max(activations {_mb(m['activations'])}, eval {_mb(m['eval_logits'])})")
    hvp = f" x{plan.get('hvp_factor', 1.0):g} for the Hessian-vector product" if plan["uses_hvp"] else ""
    lines = [f"memory plan: optimizer {plan['optimizer']} (HVP: {plan['uses_hvp']}), precision "
             f"{plan['precision']}, micro-batch {plan['batch_size']} x {plan['seq_len']} tokens"
             f"{'; activations' + hvp if hvp else ''}",
             f"{'':18}" + "".join(f"{m:>14}" for m in plan["modes"]) + "  counts"]
    for k, what in ROWS:
        lines.append(f"{k:18}" + "".join(f"{_mb(v[k]):>14}" for v in plan["modes"].values())
                     + f"  {what}")
    if "seconds_per_step" in plan:
        lines.append(f"time: {plan['seconds_per_step']:.3f} s/step (measured over "
                     f"{plan['measured_steps']} steps) -> ~{plan['estimated_seconds']:.0f} s for "
                     f"{plan['max_steps']} steps")
    return "\n".join(lines)


def longest(examples: list) -> int:
    return max((len(e["input_ids"]) for e in examples), default=1)


def eval_shape_of(opts, eval_ex: list) -> tuple[int, int] | None:
    """(examples, longest) of the eval set when the run evaluates, else None."""
    return (len(eval_ex), longest(eval_ex)) if eval_ex and opts.eval else None


# --------------------------------------------------------------------------- measuring

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _file_mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings that have a file behind them."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                lo, hi = parts[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def _storages(model) -> dict[int, int]:
    """data_ptr -> bytes of ``model``'s distinct CPU parameter and buffer storages."""
    out = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        if st.device.type == "cpu":
            out[st.data_ptr()] = st.nbytes()
    return out


def anonymous_param_bytes(model) -> int:
    """Bytes of ``model``'s parameters and buffers that live in anonymous memory (not in a
    memory-mapped checkpoint file)."""
    ranges = _file_mapped_ranges()
    return sum(n for ptr, n in _storages(model).items()
               if not any(lo <= ptr < hi for lo, hi in ranges))


def mapped_checkpoint_extra(model) -> int:
    """Bytes of the file mappings that hold some of ``model``'s parameters, beyond those
    parameters: 0 for a LoRA run on an fp32 safetensors checkpoint (the mapping is the
    weights); with --load-in-4bit the fp32 checkpoint stays mapped for the parameters left
    unquantized (embeddings, norms), and the pages that quantizing read stay resident
    (SmolLM2-135M: RssFile +514 MiB measured)."""
    ranges = _file_mapped_ranges()
    held, in_files = set(), 0
    for ptr, n in _storages(model).items():
        for r in ranges:
            if r[0] <= ptr < r[1]:
                held.add(r)
                in_files += n
                break
    return max(0, sum(hi - lo for lo, hi in held) - in_files)


class PeakMemory:
    """The process's resident memory: the baseline at construction (VmRSS), what loading the
    model added beyond its parameters (:meth:`after_load`), and the peak (VmHWM) after
    :meth:`reset`, which restarts the kernel's peak (``/proc/self/clear_refs`` 5) so that
    transients of loading the checkpoint are not counted."""

    def __init__(self):
        self.available = True
        try:
            self.start = _status_kib("VmRSS") * 1024
            self.start_anon = _status_kib("RssAnon") * 1024
        except (OSError, KeyError):
            self.available, self.start, self.start_anon = False, 0, 0
        self.loaded = self.mapped = 0
        self.window = "from the process's start"

    def after_load(self, model) -> None:
        """Records the anonymous memory loading added, less the parameters' own (counted by
        the plan as weights and trainable parameters)."""
        if self.available:
            grown = _status_kib("RssAnon") * 1024 - self.start_anon
            self.loaded = max(0, grown - anonymous_param_bytes(model))
            self.mapped = mapped_checkpoint_extra(model)

    def measured_parts(self) -> dict:
        return {"process_baseline": self.start, "loaded_other": self.loaded,
                "checkpoint_mapped": self.mapped}

    def reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.window = "from the end of model loading"
            return True
        except OSError:  # the peak then counts from the process's start (loading included)
            self.window = "from the process's start (clear_refs not writable)"
            return False

    def peak(self) -> int | None:
        return _status_kib("VmHWM") * 1024 if self.available else None


def warm_start(model_dir: str) -> None:
    """Imports the model's classes and peft and runs one tiny backward, so that a
    :class:`PeakMemory` started after it does not count code being loaded (276 MiB of the
    embedded run's resident size is transformers/peft import) or autograd's one-time setup."""
    from peft import get_peft_model  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_dir))]
    # its own RNG stream: drawing from the global one after the run's seed would shift the
    # LoRA initialisation and so every trajectory
    with torch.random.fork_rng(devices=[]):
        lin, x = torch.nn.Linear(8, 8), torch.randn(2, 8, requires_grad=True)
        torch.nn.functional.cross_entropy(lin(x), torch.zeros(2, dtype=torch.long)).backward()


def plan_main(args) -> int:
    """``--plan``: the plan for these options and a few timed steps; trains nothing else."""
    from . import train
    opts = train.resolve_options(args)
    split = train.prepare_data(opts)
    d, device = train.Dist(), train.resolve_device(opts.device, train.Dist())
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    warm_start(opts.model or train.base_model_dir())
    mem = PeakMemory()
    r = train.build_model(opts, d, device, split)
    mem.after_load(r.model)
    plan = memory_plan(opts, model_shape(opts.model or train.base_model_dir(), opts),
                       longest(r.train_ex), mem.measured_parts(), eval_shape_of(opts, r.eval_ex))
    t = train.setup_training(r)
    steps = min(3, opts.max_steps)
    t.stepper([t.stream.next().to(device) for _ in range(opts.grad_accum)])  # warm-up, not timed
    t0 = time.perf_counter()
    for _ in range(steps):
        t.stepper([t.stream.next().to(device) for _ in range(opts.grad_accum)])
    sps = (time.perf_counter() - t0) / steps
    plan.update(seconds_per_step=sps, measured_steps=steps, max_steps=opts.max_steps,
                estimated_seconds=sps * opts.max_steps)
    print(format_plan(plan), flush=True)
    return 0


def add_cli_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", action="store_true", help="print the memory and time plan "
                        "(LoRA / QLoRA / full fine-tuning; a few timed steps) and exit")
