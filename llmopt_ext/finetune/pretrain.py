"""Pretrains the embedded base model shipped in ``llmopt_ext/finetune/assets/base``.

    python -m llmopt_ext.finetune.pretrain [--steps 1200] [--out DIR]

A character-level ``LlamaForCausalLM`` (hidden 128, 4 layers, 4 heads, 0.67M parameters,
2.7 MB of fp32 safetensors) trained from scratch on packed lines of two plain-text forms of
the embedded tasks (``add 37 45 = 82``, ``reverse abc = cba``, ..., see
:func:`llmopt_ext.finetune.data.pretrain_line`). It never sees the instruction template, so LoRA
fine-tuning has a format and an instruction-to-skill mapping to learn. The tokenizer is a
``tokenizers`` WordLevel model over single characters (printable ASCII + newline), saved with
the model, so ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(dir)`` load both.

Deterministic for a given seed and thread count; 1200 steps of 16 x 128 tokens took 133-172 s
(one thread, final train loss 0.71; the spread is other processes) on this project's 2-core CPU machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import torch

from .data import generate_dataset, pretrain_line

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BASE_DIR = os.path.join(ASSETS, "base")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def build_tokenizer():
    """The character-level tokenizer as a ``PreTrainedTokenizerFast``: one token per character,
    ``<s>`` prepended by ``add_special_tokens=True``, decoding concatenates (Fuse)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # not ".": it skips "\n"
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def build_model(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                max_positions: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg)


def packed_batches(tokenizer, n_lines: int, seq_len: int, batch_size: int, seed: int):
    """All pretraining rows: lines of the plain-text corpus joined by newlines and cut into
    rows of ``seq_len`` tokens, each row starting with <s>."""
    rng = random.Random(seed)
    lines = [pretrain_line(ex, form=rng.randrange(2)) for ex in generate_dataset(n_lines, seed=seed)]
    ids: list[int] = []
    for line in lines:
        ids += tokenizer(line + "\n", add_special_tokens=False)["input_ids"]
    row = seq_len - 1
    n_rows = len(ids) // row
    data = torch.tensor(ids[:n_rows * row]).view(n_rows, row)
    bos = torch.full((n_rows, 1), tokenizer.bos_token_id)
    return torch.cat([bos, data], 1)


def pretrain(out: str = BASE_DIR, steps: int = 1200, batch_size: int = 16, seq_len: int = 128,
             lr: float = 3e-3, seed: int = 1234, log_every: int = 100) -> dict:
    torch.manual_seed(seed)
    random.seed(seed)
    tok = build_tokenizer()
    model = build_model(len(tok))
    rows = packed_batches(tok, n_lines=60000, seq_len=seq_len, batch_size=batch_size, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        idx = torch.randint(len(rows), (batch_size,), generator=g)
        x = rows[idx]
        loss_t = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = loss_t.item()
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss:.4f}  {time.perf_counter() - t0:6.1f}s", flush=True)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    info = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "seed": seed,
            "final_train_loss": loss, "seconds": round(time.perf_counter() - t0, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(os.path.join(out, "pretrain_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmopt_ext.finetune.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=BASE_DIR)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP "
                        "threads spin-wait against other processes, 37 ms -> 2 s a step measured)")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    pretrain(a.out, a.steps, a.batch_size, a.seq_len, a.lr, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
