"""Evaluation of a fine-tuned causal LM: mean token loss on held-out examples and greedy
exact match of the generated answer (per task for the embedded data)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import data as D


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
