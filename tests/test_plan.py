"""The memory and time plan (llmopt_ext.finetune.plan): optimizer state probed from the class,
the activation estimate against the tensors autograd really saves, --plan, and the plan beside
the measured peak in results.json (embedded model and the real model)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from llmopt_ext.finetune import data as D
from llmopt_ext.finetune import plan as P
from llmopt_ext.finetune import train
from llmopt_ext.finetune.cli import build_parser, main
from llmopt_ext.finetune.optimizers import OPTIMIZERS, optimizer_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max-steps", "3", "--train-size", "64", "--eval-size", "8", "--batch-size", "8",
        "--threads", "1", "--no-progress", "--no-eval"]


def _opts(*argv):
    return train.resolve_options(build_parser().parse_args(list(argv)))


def test_adamw_state_is_two_fp32_moments(monkeypatch):
    monkeypatch.delattr(torch.optim.AdamW, "state_bytes_per_param", raising=False)
    v = P.state_bytes_per_param("adamw", _opts())
    assert abs(v - 8.0) < 1e-3  # exp_avg + exp_avg_sq, plus a scalar step over 65536 elements
    assert torch.optim.AdamW.state_bytes_per_param == v  # kept on the class


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_state_is_probed(name):
    opts = _opts("--optimizer", name)
    per = P.state_bytes_per_param(name, opts)
    exact = P.state_bytes(name, opts, {(8, 128): 1})
    assert 0 <= per < 64 and 0 <= exact < 64 * 8 * 128
    if name in ("adamw", "sophiah", "adahessian"):
        assert per >= 8  # at least two fp32 tensors per parameter


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("optimizer", ["adamw", "sophiah"])  # sdpa and eager attention
def test_activation_estimate_matches_saved_tensors(optimizer):
    opts = _opts("--optimizer", optimizer, *TINY)
    torch.manual_seed(0)
    split = train.prepare_data(opts)
    r = train.build_model(opts, train.Dist(), torch.device("cpu"), split)
    ex = sorted(r.train_ex, key=lambda e: -len(e["input_ids"]))[:opts.batch_size]
    b = D.collate(ex, r.pad)
    saved = _saved_bytes(r.model, b)
    est = P.activation_bytes(P.model_shape(train.base_model_dir(), opts), b.input_ids.shape[0],
                             b.input_ids.shape[1], 4, eager=optimizer == "sophiah")
    assert abs(est - saved) <= 0.1 * saved, (est, saved)


def test_plan_prints_and_exits(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*TINY, "--plan", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("lora", "qlora", "full", "optimizer_state", "activations", "s/step"):
        assert word in text
    assert not out.exists()


def test_qlora_and_full_differ_as_expected():
    opts = _opts()
    s = P.model_shape(train.base_model_dir(), opts)
    m = P.memory_plan(opts, s, 64)["modes"]
    assert m["qlora"]["frozen_weights"] < m["lora"]["frozen_weights"] / 2
    assert m["full"]["trainable"] == 4 * s.params and m["full"]["optimizer_state"] > 7.9 * s.params
    hvp = P.memory_plan(_opts("--optimizer", "sophiah"), s, 64)["modes"]["lora"]["activations"]
    assert hvp > P.HVP_FACTOR * m["lora"]["activations"]  # and eager attention's probabilities


EVAL = ["--eval-size", "4", "--em-samples", "2", "--max-new-tokens", "4"]
SHORT = ["--max-steps", "3", "--batch-size", "2", "--threads", "1", "--no-progress", *EVAL]


def _run(tmp_path, *argv):
    """A fresh process: in this one, memory earlier tests freed is still resident and would be
    reused without raising the peak. Returns (planned, measured, baseline) bytes from
    results.json, after checking that the printed plan total is the stored one."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "llmopt_ext.finetune", *argv, "--output-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "s/step over the first" in r.stdout
    printed = re.search(r"memory plan \(lora, [^)]*\): ([\d,.]+) MiB", r.stdout)
    assert printed, r.stdout[-2000:]
    with open(out / "results.json") as f:
        mem = json.load(f)["memory"]
    assert printed.group(1) == f"{mem['planned_bytes'] / 2**20:,.1f}"
    assert f"memory: peak {mem['measured_peak_bytes'] / 2**20:,.1f} MiB resident" in r.stdout
    return mem["planned_bytes"], mem["measured_peak_bytes"], mem["process_baseline_bytes"]


def _report(what, planned, measured, base):
    print(f"{what}: plan {planned / 2**20:.1f} MiB, measured VmHWM {measured / 2**20:.1f} MiB "
          f"({planned / measured - 1:+.1%}); beyond the process baseline {base / 2**20:.1f} MiB: "
          f"plan {(planned - base) / 2**20:.1f}, measured {(measured - base) / 2**20:.1f}")


@pytest.mark.parametrize("optimizer", ["adamw", "sophiah", "adahessian"])
def test_embedded_plan_within_20_percent(tmp_path, optimizer):
    """The whole process's peak (interpreter and libraries included: ~519 MiB of ~555-590).
    So that the model's part is not lost in the baseline, the planned rise over the baseline
    must also be 0.35-1.2x the measured rise (measured: adamw 0.42, sophiah 0.76, adahessian
    0.57; the rest is torch's first use of its kernels and the allocator keeping freed blocks;
    AdamW without the activations would be 0.22)."""
    planned, measured, base = _run(tmp_path, *SHORT, "--train-size", "64", "--optimizer", optimizer)
    _report(f"embedded {optimizer}", planned, measured, base)
    assert abs(planned / measured - 1) <= 0.20
    assert 0.35 <= (planned - base) / (measured - base) <= 1.2


@pytest.mark.parametrize("optimizer", ["adamw", "sophiah"])
def test_real_model_plan_within_20_percent(tmp_path, real_model_dir, optimizer):
    """SmolLM2-135M: the weights and (SophiaH) the Hessian-vector product's graph are most of
    the peak; the x2 rule for that graph would plan 21-25% under the measured SophiaH peak
    (1490 vs 1898-1980 MiB)."""
    planned, measured, base = _run(tmp_path, "--model", real_model_dir, *SHORT, "--max-length", "64",
                                   "--train-size", "16", "--optimizer", optimizer)
    _report(f"real model {optimizer}", planned, measured, base)
    assert abs(planned / measured - 1) <= 0.20


def test_parameters_in_a_mapped_checkpoint_are_not_anonymous():
    """The plan counts what loading added beyond the parameters: a safetensors checkpoint's
    parameters stay in its memory-mapped file, a copy of them is anonymous memory."""
    import copy

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(train.base_model_dir(), dtype=torch.float32)
    total = sum(p.untyped_storage().nbytes() for p in model.parameters())
    assert P.anonymous_param_bytes(model) < 0.01 * total
    assert P.anonymous_param_bytes(copy.deepcopy(model)) >= total


def test_mapped_checkpoint_beyond_its_parameters():
    """What --load-in-4bit leaves resident: the checkpoint file stays mapped for the parameters
    still in it, the replaced (quantized) ones' pages with it. Replacing the decoder's linear
    weights by copies stands in for quantizing them."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(train.base_model_dir(), dtype=torch.float32)
    assert P.mapped_checkpoint_extra(model) < 64 * 1024  # the header and page rounding
    replaced = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            replaced += m.weight.numel() * 4
            m.weight = torch.nn.Parameter(m.weight.detach().clone())
    assert replaced > 0 and abs(P.mapped_checkpoint_extra(model) - replaced) < 64 * 1024


def test_total_counts_the_larger_of_step_and_eval():
    opts = _opts()
    s = P.model_shape(train.base_model_dir(), opts)
    base = {"process_baseline": 500 * 2**20, "loaded_other": 3 * 2**20}
    small = P.memory_plan(opts, s, 64, base, eval_shape=(4, 64))["modes"]["lora"]
    big = P.memory_plan(opts, s, 64, base, eval_shape=(200, 4000))["modes"]["lora"]
    rest = sum(small[k] for k in ("process_baseline", "loaded_other", "frozen_weights",
                                  "trainable", "gradients", "optimizer_state"))
    assert small["eval_logits"] < small["activations"] and small["total"] == rest + small["activations"]
    assert big["eval_logits"] == 3 * 32 * 4000 * s.vocab * 4  # eval_loss's batch of 32
    assert big["total"] == rest + big["eval_logits"]


def test_warm_start_leaves_the_global_rng_alone():
    """The memory plan's warm-up must not move the run's RNG (it set the LoRA init apart from a
    run without it: a 12-step AdamW loss history changed from step 2 on)."""
    from llmopt_ext.finetune import plan as P
    from llmopt_ext.finetune.pretrain import BASE_DIR
    torch.manual_seed(0)
    before = torch.get_rng_state()
    P.warm_start(BASE_DIR)
    assert torch.equal(torch.get_rng_state(), before)
