"""QLoRA: a bitsandbytes NF4 (4-bit, double-quantized) base under LoRA adapters, on CUDA or CPU.

bitsandbytes 0.50's ``Linear4bit`` has CPU kernels (quantize, dequantize, the 4-bit matmul), so
``--load-in-4bit`` runs on CPU too: SmolLM2-135M loads in ~6 s and a LoRA forward+backward
over it works. Double backward runs (finite, symmetric HVPs) but is NOT exact: the NF4 model's
HVP differs from that of the fp32 model with the same dequantized weights by 65-73% (embedded
model) while loss and gradient agree to 1e-7; bitsandbytes' 4-bit matmul loses second-order
terms (tests/test_qlora.py keeps this as a strict xfail). Second-order optimizers on a 4-bit
base therefore use a wrong curvature.

:func:`merge_dequantized` exports a merged model in 16 bits: peft's ``merge_and_unload`` on a
4-bit base would re-quantize the merged weight to NF4 and lose most of the adapter's delta
(NF4 steps are ~1/8 of a block's absmax, LoRA deltas typically far smaller).
"""
from __future__ import annotations

import torch

from .optimizers import UsageError

# the oldest release the CPU path was tested with
MIN_CPU_VERSION = (0, 50)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())


def quantization_kwargs(device: torch.device, precision: str) -> dict:
    """``from_pretrained`` keyword arguments for an NF4 base on ``device``; a clear
    :class:`UsageError` when bitsandbytes is missing or too old for it."""
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes==0.50.2") from None
    if device.type == "cpu" and _version(bitsandbytes.__version__) < MIN_CPU_VERSION:
        raise UsageError(f"--load-in-4bit on CPU needs bitsandbytes >= "
                         f"{'.'.join(map(str, MIN_CPU_VERSION))} (its CPU NF4 kernels; "
                         f"found {bitsandbytes.__version__}): pip install bitsandbytes==0.50.2")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--load-in-4bit: device {device.type} is not supported (cpu or cuda)")
    from transformers import BitsAndBytesConfig
    # fp32 precision on CPU computes in fp32 (the most accurate; CPU has no fast bf16 matmul to
    # gain); on CUDA, as before, bf16 unless fp16 was asked for
    compute = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        precision, torch.float32 if device.type == "cpu" else torch.bfloat16)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    device_map = {"": "cpu"} if device.type == "cpu" else {"": device.index or 0}
    return {"quantization_config": cfg, "device_map": device_map}


def keep_trainable_layout(model) -> int:
    """Stops bitsandbytes' CPU inference repacking of every ``Linear4bit`` in ``model``;
    returns how many layers it set.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a layer's weight on its first forward
    in eval mode without grad (an evaluation) into a layout only its ``gemv_4bit`` reads, with
    the absmax rounded to bf16, and never unpacks it on ``train()``. ``gemv_4bit`` has no
    autograd formula: after an evaluation, training silently loses the gradient through every
    frozen 4-bit layer (torch warns "an autograd kernel was not registered"). Measured on
    the embedded model in 4 bits: after one evaluation the first layer's LoRA-A gradient
    differed from the un-evaluated model's by 110% (relative norm; tests/test_qlora.py)."""
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def is_quantized(model) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Params4bit") or
               type(getattr(m, "weight", None)).__name__ == "Params4bit" for m in model.modules())


def dequantized_weights(model) -> dict[str, torch.Tensor]:
    """Module name (as in the un-wrapped base model) -> the fp32 weight its 4-bit layer
    computes with."""
    import bitsandbytes.functional as F
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if type(w).__name__ == "Params4bit":
            out[name] = F.dequantize_4bit(w.data, w.quant_state).float()
    return out


def merge_dequantized(peft_model, model_dir: str, dtype: torch.dtype = torch.bfloat16):
    """A plain (unquantized) model of ``dtype``: the base from ``model_dir`` with every 4-bit
    layer's weight replaced by its dequantized NF4 weight (what training saw), the adapters of
    ``peft_model`` merged in (in fp32, then cast)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    prefix = "base_model.model."
    deq = {k[len(prefix):] if k.startswith(prefix) else k: v
           for k, v in dequantized_weights(peft_model).items()}
    deq = {k.replace(".base_layer", ""): v for k, v in deq.items()}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    modules = dict(base.named_modules())
    with torch.no_grad():
        for name, w in deq.items():
            if name not in modules or modules[name].weight.shape != w.shape:
                raise RuntimeError(f"merge: 4-bit layer {name} has no matching layer in {model_dir}")
            modules[name].weight.copy_(w)
    name = peft_model.active_adapter
    cfg = peft_model.peft_config[name]
    plain = get_peft_model(base, _plain_config(cfg))
    set_peft_model_state_dict(plain, get_peft_model_state_dict(peft_model, adapter_name=name))
    return plain.merge_and_unload().to(dtype)


def _plain_config(cfg):
    """A copy of a LoraConfig without custom-module mappings (peft's own layers merge)."""
    import copy
    cfg = copy.deepcopy(cfg)
    if hasattr(cfg, "_custom_modules"):
        cfg._custom_modules = None
    cfg.inference_mode = True
    return cfg
