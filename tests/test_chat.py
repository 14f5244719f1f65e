"""--template chat and conversational data (the real model's ChatML tokenizer; no weights
needed), KV-cached generation against the uncached greedy loop it replaced, --eval-every,
--config and the honest final message (embedded model)."""
import importlib.util
import json
import sys

import pytest
import torch

if importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("peft and transformers are needed", allow_module_level=True)

from llmopt_ext.finetune import data as D  # noqa: E402
from llmopt_ext.finetune.cli import build_parser, main, parse_args  # noqa: E402

TINY = ["--train-size", "48", "--eval-size", "8", "--em-samples", "4", "--max-new-tokens", "4",
        "--batch-size", "4", "--threads", "1", "--no-progress", "--max-steps", "3"]
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat_tok(real_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(real_model_dir)


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmopt_ext.finetune.pretrain import BASE_DIR
    return AutoModelForCausalLM.from_pretrained(BASE_DIR).eval(), AutoTokenizer.from_pretrained(BASE_DIR)


def _learned(tok, e):
    return [tok.decode([i]) for i, l in zip(e["input_ids"], e["labels"]) if l != D.IGNORE_INDEX]


# ------------------------------------------------------------------------------- chat encoding

def test_chat_tokens_are_the_templates_and_only_assistant_turns_are_learned(chat_tok):
    e = D.encode_example(chat_tok, {"messages": CONV}, "chat", 512)
    full = chat_tok.apply_chat_template(CONV, tokenize=False)
    assert e["input_ids"] == chat_tok(full, add_special_tokens=False)["input_ids"]
    # both assistant turns with their end-of-turn token; not the newline after it
    assert _learned(chat_tok, e) == ["Hello", " there", ".", "<|im_end|>", "4", "<|im_end|>"]
    assert e["labels"][-1] == D.IGNORE_INDEX and chat_tok.decode(e["input_ids"][-1:]) == "\n"
    prompt = chat_tok.decode(D.prompt_ids(chat_tok, {"messages": CONV}, "chat"))
    assert prompt == chat_tok.apply_chat_template(CONV[:-1], tokenize=False, add_generation_prompt=True)


def test_alpaca_record_in_chat_is_a_user_and_an_assistant_turn(chat_tok):
    ex = {"instruction": "Add the two numbers.", "input": "12 30", "output": "42"}
    e = D.encode_example(chat_tok, ex, "chat", 512)
    msgs = [{"role": "user", "content": "Add the two numbers.\n\n12 30"},
            {"role": "assistant", "content": "42"}]
    assert e["input_ids"] == chat_tok(chat_tok.apply_chat_template(msgs, tokenize=False),
                                      add_special_tokens=False)["input_ids"]
    assert _learned(chat_tok, e) == ["4", "2", "<|im_end|>"]
    assert D.encode_example(chat_tok, ex, "chat", e["prompt_len"]) is None  # truncated away


def test_chat_needs_a_chat_template(base, tmp_path, capsys):
    with pytest.raises(D.DataError, match="no chat template"):
        D.encode_example(base[1], {"instruction": "a", "output": "b"}, "chat", 64)
    assert main([*TINY, "--template", "chat", "--output-dir", str(tmp_path / "o")]) == 2
    assert "no chat template" in capsys.readouterr().err


# ---------------------------------------------------------------------------- conversational data

def test_load_conversations(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": CONV}) + "\n\n" + json.dumps({"messages": CONV[1:3]}) + "\n")
    recs = D.load_alpaca(str(p))
    assert [r["messages"] for r in recs] == [CONV, CONV[1:3]]
    assert D.reference_answer(recs[0]) == "4"
    # single-turn conversations also work with the Alpaca-style templates; multi-turn do not
    assert D.as_alpaca(recs[1], "alpaca")["instruction"] == "Hi"
    with pytest.raises(D.DataError, match="--template chat"):
        D.as_alpaca(recs[0], "alpaca")


@pytest.mark.parametrize("msgs,match", [
    ([{"role": "bot", "content": "x"}], r"c.jsonl:2: message 0 has role 'bot'"),
    ([{"role": "user"}], r"c.jsonl:2: message 0 has no 'content'"),
    ([{"content": "x"}], r"c.jsonl:2: message 0 has no 'role'"),
    ([{"role": "user", "content": "q"}], r"c.jsonl:2: no assistant turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ["a"]}],
     r"c.jsonl:2: message 1 \(assistant\): 'content' must be a string, got list"),
    ([], r"c.jsonl:2: 'messages' must be a non-empty list"),
    (["hi"], r"c.jsonl:2: message 0 must be an object"),
])
def test_conversation_errors_name_file_and_line(tmp_path, msgs, match):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": CONV}) + "\n" + json.dumps({"messages": msgs}) + "\n")
    with pytest.raises(D.DataError, match=match):
        D.load_alpaca(str(p))


# ------------------------------------------------------------------------------ generation

@torch.no_grad()
def _uncached_greedy(model, tok, prompts, max_new_tokens):
    """The greedy loop greedy_generate replaced: the whole sequence through the model for
    every token, positions from the left padding, EOS-finished rows kept at EOS."""
    pad, eos = D.pad_id(tok), tok.eos_token_id
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    done = torch.zeros(len(prompts), dtype=torch.bool)
    gen = []
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        done |= nxt == eos
        gen.append(nxt)
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if bool(done.all()):
            break
    return [r[:r.index(eos)] if eos in r else r for r in torch.stack(gen, 1).tolist()]


def test_cached_generation_equals_the_uncached_greedy_loop(base):
    from llmopt_ext.finetune.evaluate import greedy_generate
    model, tok = base
    recs = D.generate_dataset(24, seed=11)
    # prompts of different lengths (left padding), some answers stopping at EOS early
    prompts = [D.prompt_ids(tok, r, "compact") for r in recs] + [
        tok("add 37 45 =")["input_ids"], tok("reverse abc =")["input_ids"]]
    assert len({len(p) for p in prompts}) > 3
    ref = _uncached_greedy(model, tok, prompts, 12)
    got = greedy_generate(model, tok, prompts, "cpu", 12, batch_size=8)
    assert got == ref
    assert any(len(g) > 2 for g in got)


# ---------------------------------------------------------------------- --eval-every, message

def _results(out):
    with open(out / "results.json") as f:
        return json.load(f)


def test_eval_every_and_the_message_names_only_what_was_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main([*TINY, "--eval-every", "2", "--max-steps", "5", "--output-dir", str(out)]) == 0
    r = _results(out)
    assert [h[0] for h in r["eval_history"]] == [2, 4]
    assert all(h[1] > 0 for h in r["eval_history"])
    msg = capsys.readouterr().out.strip().splitlines()[-1]
    assert msg == f"saved adapter/, config.yaml, results.json in {out}"
    assert not (out / "loss_curve.png").exists()
    assert "matplotlib is not installed" in r["notes"][0]


def test_eval_every_must_not_be_negative(tmp_path, capsys):
    assert main([*TINY, "--eval-every", "-1", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--eval-every must be >= 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- --config

def test_config_sets_defaults_and_flags_override(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("max-steps: 7\nlr: 1e-3\nno_eval: true\nlora_r: 4\nfused: false\ntemplate: alpaca\n")
    a = parse_args(["--config", str(p), "--lora-r", "2"])
    assert (a.max_steps, a.lr, a.eval, a.lora_r, a.fused, a.template) == (7, 1e-3, False, 2, False, "alpaca")
    assert parse_args([]).max_steps == build_parser().parse_args([]).max_steps


@pytest.mark.parametrize("text,match", [
    ("max_stepz: 3\n", "unknown key 'max_stepz'"),
    ("max_steps: 2.5\n", "'max_steps' must be an integer"),
    ("lr: fast\n", "'lr': invalid float value 'fast'"),
    ("template: chatml\n", "'template' must be one of alpaca, chat, compact"),
    ("merge: 1\n", "'merge' must be true or false"),
    ("- 1\n", "expected a mapping"),
    ("a: [\n", "invalid YAML"),
])
def test_config_errors_name_the_key(tmp_path, capsys, text, match):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    assert main(["--config", str(p), "--output-dir", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_saved_config_repeats_the_run(tmp_path):
    first = tmp_path / "first"
    assert main([*TINY, "--optimizer", "sophiag", "--hessian-every", "2", "--lr", "3e-3",
                 "--output-dir", str(first)]) == 0
    again = tmp_path / "again"
    assert main(["--config", str(first / "config.yaml"), "--output-dir", str(again)]) == 0
    a, b = _results(first), _results(again)
    assert a["train"]["history"] == b["train"]["history"]
    assert a["after"] == b["after"]
    cfg_a = (first / "config.yaml").read_text().replace(str(first), "X")
    assert cfg_a == (again / "config.yaml").read_text().replace(str(again), "X")
