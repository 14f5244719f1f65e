"""llmopt_ext.finetune: embedded data, Alpaca loading with prompt masking, bad input, the CLI end
to end with every optimizer on the embedded model, resume, DDP under torchrun (gloo)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

# find_spec, not importorskip: importing peft at collection imports triton, whose interpreter
# switch (TRITON_INTERPRET, set by test_lora.py when it is collected) must be read after that
if importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("peft and transformers are needed", allow_module_level=True)

from llmopt_ext.finetune import data as D  # noqa: E402
from llmopt_ext.finetune.cli import main  # noqa: E402
from llmopt_ext.finetune.train import OPTIMIZERS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--train-size", "64", "--eval-size", "8", "--em-samples", "4", "--max-new-tokens", "4",
        "--batch-size", "4", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these models are tiny, and two OpenMP threads on a shared 2-core
    machine spin-wait against other processes (37 ms -> 2 s a training step measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    from llmopt_ext.finetune.pretrain import BASE_DIR
    return AutoTokenizer.from_pretrained(BASE_DIR)


def _run(tmp_path, *argv, name="out"):
    out = tmp_path / name
    rc = main([*TINY, "--output-dir", str(out), *argv])
    return rc, out


def _results(out):
    with open(out / "results.json") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------- data

def test_generated_dataset_is_deterministic_and_correct():
    a, b = D.generate_dataset(300, seed=5), D.generate_dataset(300, seed=5)
    assert a == b and a != D.generate_dataset(300, seed=6)
    assert {r["task"] for r in a} == set(D.TASKS)
    for r in a:
        if r["task"] == "add":
            x, y = map(int, r["input"].split())
            assert int(r["output"]) == x + y
        elif r["task"] == "reverse":
            assert r["output"] == r["input"][::-1]
        elif r["task"] == "copy":
            assert r["output"] == r["input"]
        elif r["task"] == "sort":
            assert r["output"] == "".join(sorted(r["input"]))


def test_char_tokenizer_round_trip(tokenizer):
    s = "### Instruction:\nAdd the two numbers.\n\n### Input:\n37 45\n"
    ids = tokenizer(s, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(s) and tokenizer.decode(ids) == s
    assert tokenizer(s)["input_ids"][0] == tokenizer.bos_token_id


@pytest.mark.parametrize("template", ["compact", "alpaca"])
def test_encode_masks_the_prompt(tokenizer, template):
    ex = {"instruction": "Reverse the letters.", "input": "abc", "output": "cba"}
    e = D.encode_example(tokenizer, ex, template, max_length=512)
    prompt = D.format_prompt(ex, template)
    assert prompt.endswith("### Response:\n") and "abc" in prompt
    n = e["prompt_len"]
    assert n == len(prompt) + 1  # one token per character plus <s>
    assert e["labels"][:n] == [D.IGNORE_INDEX] * n
    assert e["labels"][n:] == e["input_ids"][n:]
    assert tokenizer.decode(e["input_ids"][n:-1]) == "cba"
    assert e["input_ids"][-1] == tokenizer.eos_token_id
    # without input the template has no Input section
    assert "### Input" not in D.format_prompt({"instruction": "x", "output": "y"}, template)
    # truncation inside the prompt leaves no response token: the example is dropped
    assert D.encode_example(tokenizer, ex, template, max_length=5) is None


def test_collate_pads_and_ignores_padding(tokenizer):
    exs = [D.encode_example(tokenizer, r, "compact", 256) for r in D.generate_dataset(5, seed=1)]
    b = D.collate(exs, D.pad_id(tokenizer))
    for i, e in enumerate(exs):
        k = len(e["input_ids"])
        assert b.attention_mask[i, :k].all() and not b.attention_mask[i, k:].any()
        assert (b.labels[i, k:] == D.IGNORE_INDEX).all()
    assert b.n_tokens == sum(len(e["input_ids"]) for e in exs)


def test_load_alpaca_json_and_jsonl(tmp_path):
    recs = [{"instruction": "Say hi.", "output": "hi"},
            {"instruction": "Copy.", "input": "ab", "output": "ab"}]
    j = tmp_path / "d.json"
    j.write_text(json.dumps(recs))
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    for path in (j, jl):
        got = D.load_alpaca(str(path))
        assert [(r["instruction"], r["input"], r["output"]) for r in got] == \
            [("Say hi.", "", "hi"), ("Copy.", "ab", "ab")]


@pytest.mark.parametrize("content, match", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": oops}\n',
     r"d\.jsonl:3: invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', r"d\.jsonl:3: missing key 'output'"),
    ('{"instruction": "a", "output": 5}\n', r"d\.jsonl:1: 'output' must be a string"),
    ("", r"empty"),
    ("\n\n", r"empty"),
])
def test_load_alpaca_errors_name_the_line(tmp_path, content, match):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(D.DataError, match=match):
        D.load_alpaca(str(p))


def test_load_alpaca_json_errors(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": \n]')
    with pytest.raises(D.DataError, match=r"d\.json:4: invalid JSON"):
        D.load_alpaca(str(p))
    p.write_text("[]")
    with pytest.raises(D.DataError, match="empty"):
        D.load_alpaca(str(p))
    with pytest.raises(D.DataError, match="no such data file"):
        D.load_alpaca(str(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------------------ bad CLI input

@pytest.mark.parametrize("argv, match", [
    (["--data", "MISSING"], "no such data file"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--optimizer", "trcg", "--lr", "0.1"], "has no learning rate"),
    (["--optimizer", "oasis", "--precision", "fp16"], "GradScaler"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--optimizer", "aisarah", "--aisarah-anchor", "-1"], "--aisarah-anchor must be >= 0"),
])
def test_cli_bad_input(tmp_path, capsys, argv, match):
    argv = [a.replace("MISSING", str(tmp_path / "nope.jsonl")) for a in argv]
    rc, out = _run(tmp_path, *argv)
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_cli_malformed_and_empty_data(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    assert _run(tmp_path, "--data", str(bad))[0] == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert _run(tmp_path, "--data", str(empty))[0] == 2
    assert "empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end

@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_cli_every_optimizer(tmp_path, opt):
    extra = ["--cg-iters", "3"] if opt == "trcg" else []
    rc, out = _run(tmp_path, "--optimizer", opt, "--max-steps", "2", *extra)
    assert rc == 0
    r = _results(out)
    assert r["train"]["steps"] == 2 and all(
        torch.isfinite(torch.tensor(x)) for x in (r["train"]["final_loss"], r["after"]["eval_loss"]))
    assert 0.0 <= r["after"]["exact_match"] <= 1.0
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    # the adapter changed (B starts at zero in peft, so any step moves it off zero)
    from safetensors.torch import load_file
    w = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in w.items())


def test_cli_learns_and_saves_a_peft_adapter(tmp_path):
    """40 AdamW steps: the eval loss on held-out prompts drops well below the base model's
    (~5.0 -> < 2 measured), the adapter loads into plain peft and reproduces the logits, and
    --generate / the loss curve / --merge are written."""
    rc, out = _run(tmp_path, "--max-steps", "40", "--generate", "Add the two numbers.",
                   "--generate-input", "12 30", "--merge", "--no-fused")
    assert rc == 0
    r = _results(out)
    assert r["after"]["eval_loss"] < 0.7 * r["before"]["eval_loss"]
    assert isinstance(r["generation"], str)
    pytest.importorskip("matplotlib")
    assert (out / "loss_curve.png").stat().st_size > 1000

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from llmopt_ext.finetune.pretrain import BASE_DIR
    x = torch.tensor([[1, 10, 20, 30, 40]])
    base = AutoModelForCausalLM.from_pretrained(BASE_DIR)
    with torch.no_grad():
        ref = base(x).logits
        peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        tuned = peft_model(x).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))(x).logits
    assert not torch.allclose(tuned, ref)
    torch.testing.assert_close(merged, tuned, atol=1e-4, rtol=1e-4)


def test_cli_with_data_file_and_precisions(tmp_path):
    recs = D.generate_dataset(40, seed=3)
    p = tmp_path / "train.jsonl"
    p.write_text("\n".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")})
                           for r in recs))
    for prec in ("bf16", "fp16"):
        rc, out = _run(tmp_path, "--data", str(p), "--template", "compact", "--max-steps", "2",
                       "--precision", prec, "--grad-accum", "2", name=prec)
        assert rc == 0
        r = _results(out)
        assert r["before"]["em_samples"] == 4  # 10% of 40 held out
        assert torch.isfinite(torch.tensor(r["after"]["eval_loss"]))
        assert r["train"]["fused_fallbacks"] == {}  # the fused layer ran under autocast


@pytest.mark.parametrize("opt", ["adamw", "trcg", "sophiag", "oasis"])
def test_resume_gives_the_same_adapter(tmp_path, opt):
    extra = ["--optimizer", opt, "--max-steps", "4", "--no-eval", "--hessian-every", "1"] + (
        ["--cg-iters", "3"] if opt == "trcg" else [])
    assert _run(tmp_path, *extra, name="straight")[0] == 0
    assert _run(tmp_path, *extra, "--save-every", "2", name="first")[0] == 0
    ck = tmp_path / "first" / "checkpoint"
    from llmopt_ext.finetune.checkpoint import decode_state
    assert decode_state(str(ck / "state.safetensors"))["step"] == 2
    assert _run(tmp_path, *extra, "--resume", str(ck), name="resumed")[0] == 0
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


@pytest.mark.parametrize("opt", ["adamw", "hyperadamw", "adahessian", "oasis", "aisarah"])
def test_torchrun_gloo_two_ranks(tmp_path, opt):
    """2-process DDP run: parameters identical on both ranks, only rank 0 writes."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llmopt_ext.finetune", *TINY, "--device", "cpu", "--optimizer", opt,
           "--max-steps", "2", "--output-dir", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    r = _results(out)
    assert r["train"]["max_rank_param_diff"] == 0.0
    assert sorted(os.listdir(out)) == sorted(["adapter", "config.yaml", "results.json"] + (
        ["loss_curve.png"] if (out / "loss_curve.png").exists() else []))


# --------------------------------------------------------------------------- Trainer integration

@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_llmopt_trainer_every_optimizer(tmp_path, tokenizer, opt):
    """LlmoptTrainer runs 3 steps with each optimizer and moves the LoRA weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments
    from llmopt_ext.finetune.hf import LlmoptTrainer
    from llmopt_ext.finetune.pretrain import BASE_DIR
    from llmopt_ext.finetune.train import make_optimizer
    from llmopt_ext.finetune.cli import build_parser

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE_DIR, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    args = build_parser().parse_args(["--optimizer", opt, "--lora-r", "4", "--cg-iters", "3",
                                      "--hessian-every", "2"])
    optimizer = make_optimizer(opt, params, args, total_steps=3)
    exs = D.encode_dataset(tokenizer, D.generate_dataset(24, seed=2), "compact", 128)
    pad = D.pad_id(tokenizer)

    def collator(batch):
        b = D.collate(batch, pad)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                              report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                              remove_unused_columns=False, disable_tqdm=True)
    trainer = LlmoptTrainer(model=model, args=targs, train_dataset=exs, data_collator=collator,
                            optimizers=(optimizer, None))
    out = trainer.train()
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))
