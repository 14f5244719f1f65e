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


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, n - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[j, n - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], device, max_new_tokens: int,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy decoding of left-padded batches with a KV cache (``model.generate``; the
    attention mask gives the padded rows their positions). Each answer stops at EOS, which is
    not part of it. Without a cache every new token re-ran the whole sequence and computed
    the logits of every position (16 prompts of ~40 tokens, 49k vocabulary: 31M logits per
    new token instead of 0.8M); the tokens are the same (tests/test_chat.py)."""
    from transformers import GenerationConfig

    model.eval()
    pad, eos = D.pad_id(tokenizer), tokenizer.eos_token_id
    # an explicit config: the checkpoint's own may ask for sampling or other stop tokens
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                           pad_token_id=pad, eos_token_id=eos, num_beams=1)
    outs: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(prompts[i:i + batch_size], pad, device)
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        for row in gen[:, ids.shape[1]:].tolist():
            outs.append(row[:row.index(eos)] if eos is not None and eos in row else row)
    return outs


def exact_match(model, tokenizer, records: list[dict], template: str, device,
                max_new_tokens: int) -> tuple[float, dict]:
    """Greedy answers compared with the reference (the output, or the last assistant turn),
    both stripped; overall and per task."""
    prompts = [D.prompt_ids(tokenizer, r, template) for r in records]
    outs = greedy_generate(model, tokenizer, prompts, device, max_new_tokens)
    per: dict[str, list[int]] = {}
    for r, o in zip(records, outs):
        ok = tokenizer.decode(o, skip_special_tokens=True).strip() == D.reference_answer(r).strip()
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
