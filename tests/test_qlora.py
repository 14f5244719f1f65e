"""QLoRA on CPU: bitsandbytes NF4 base layers under LoRA (bitsandbytes >= 0.50 has CPU
kernels). Gradients through 4-bit layers survive an evaluation, a second-order optimizer's HVPs
go through them, the CLI runs end to end on the real model and --merge exports 16 bits."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from llmopt_ext.finetune import qlora, train  # noqa: E402
from llmopt_ext.finetune.cli import build_parser, main  # noqa: E402

pytestmark = pytest.mark.skipif(qlora._version(bnb.__version__) < qlora.MIN_CPU_VERSION,
                                reason="bitsandbytes without CPU NF4 kernels")
CPU = torch.device("cpu")


def _args(*argv):
    return build_parser().parse_args(["--load-in-4bit", "--lora-r", "4", *argv])


def _lora_4bit(*argv, nonzero_b=True):
    args = _args(*argv)
    model, tok = train.load_model(args, CPU)
    pm = train.add_lora(model, args)
    if nonzero_b:  # B = 0 at init: no gradient would flow back through the adapters at all
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm, tok


def _batch(vocab, n=2, t=24, seed=1):
    ids = torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _first_layer_grad(pm, batch):
    pm.zero_grad()
    pm.train()
    pm(**batch).loss.backward()
    return next(p.grad.clone() for n, p in pm.named_parameters() if "layers.0." in n and "lora_A" in n)


def test_base_is_4bit_and_lora_trains():
    pm, _ = _lora_4bit()
    assert qlora.is_quantized(pm)
    assert sum(type(m).__name__ == "Linear4bit" for m in pm.modules()) > 0
    assert all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)


def test_evaluation_does_not_break_later_gradients():
    """bitsandbytes repacks Linear4bit for inference on the first eval-mode no-grad forward
    (AVX512-BF16 CPUs) into a layout whose matmul has no backward; load_model turns it off."""
    ref, after = _grads_around_an_eval(_lora_4bit()[0])
    assert torch.allclose(after, ref, rtol=1e-5, atol=1e-7), float((after - ref).abs().max() / ref.abs().max())


def _grads_around_an_eval(pm):
    """The first layer's LoRA gradient before and after one eval-mode no-grad forward."""
    batch = _batch(pm.config.vocab_size)
    ref = _first_layer_grad(pm, batch)
    pm.eval()
    with torch.no_grad():
        pm(input_ids=batch["input_ids"])
    return ref, _first_layer_grad(pm, batch)


def test_repacking_bug_is_real_without_the_guard():
    """The regression the guard exists for: with bitsandbytes' repacking left on (and a CPU
    that has AVX512-BF16), the first layer's LoRA gradient changes after one evaluation."""
    pm, _ = _lora_4bit()
    layers = [m for m in pm.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    from bitsandbytes.functional import has_avx512bf16
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    ref, after = _grads_around_an_eval(pm)
    rel = float((after - ref).norm() / ref.norm())
    print(f"first-layer LoRA-A gradient after an eval with repacking: relative change {rel:.3f}")
    assert rel > 0.05


def test_second_order_hvp_through_4bit_layers():
    """SophiaH (Hutchinson HVPs: double backward) through NF4 layers: finite, symmetric
    (v'Hw = w'Hv), and close to the fp32-base HVP of the same adapters."""
    from torch.autograd import grad
    pm, _ = _lora_4bit("--optimizer", "sophiah", "--target-modules", "q_proj,v_proj")
    params = [p for p in pm.parameters() if p.requires_grad]
    batch = _batch(pm.config.vocab_size)
    gs = grad(pm(**batch).loss, params, create_graph=True)
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g) for p in params]
    w = [torch.randn(p.shape, generator=g) for p in params]
    hv = grad(gs, params, v, retain_graph=True)
    hw = grad(gs, params, w)
    vhw = sum((a * b).sum() for a, b in zip(v, hw))
    whv = sum((a * b).sum() for a, b in zip(w, hv))
    assert torch.isfinite(vhw) and torch.isfinite(whv)
    assert abs(float(vhw - whv)) <= 1e-3 * abs(float(vhw)) + 1e-6


def _cli_4bit(tmp_path, model_dir, *argv):
    out = tmp_path / "out"
    rc = main(["--model", model_dir, "--load-in-4bit", "--output-dir", str(out), "--no-progress",
               "--max-steps", "2", "--batch-size", "1", "--max-length", "32", "--train-size", "4",
               "--eval-size", "1", "--em-samples", "1", "--max-new-tokens", "2",
               "--target-modules", "q_proj,v_proj", "--lora-r", "4", "--seed", "0", *argv])
    assert rc == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_cli_sophiah_4bit_embedded(tmp_path):
    _, res = _cli_4bit(tmp_path, train.base_model_dir(), "--optimizer", "sophiah",
                       "--hessian-every", "1", "--train-size", "16", "--max-steps", "3",
                       "--max-length", "96", "--template", "compact")
    losses = [h[1] for h in res["train"]["history"]]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))


def test_cli_real_model_4bit_with_merge(tmp_path, real_model_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    out, res = _cli_4bit(tmp_path, real_model_dir, "--merge", "--no-eval", "--lr", "1e-2",
                        "--max-length", "96")
    assert res["options"]["load_in_4bit"] and len(res["train"]["history"]) == 2
    assert all(torch.isfinite(torch.tensor([h[1] for h in res["train"]["history"]])))
    with safe_open(os.path.join(out, "merged", "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not any("absmax" in k or "quant" in k for k in keys)  # a plain checkpoint
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged"), dtype=torch.float32)
    # the merge is what the 4-bit model + adapter computes: reload that and compare logits
    from peft import PeftModel
    args = _args("--model", real_model_dir)
    base4, _ = train.load_model(args, CPU)
    qmodel = PeftModel.from_pretrained(base4, os.path.join(out, "adapter")).eval()
    ids = torch.tensor([[1, 400, 2000, 30, 77, 9000]])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, qmodel(input_ids=ids).logits
    rel = float((a - b).norm() / b.norm())
    print(f"merged 16-bit vs 4-bit+adapter logits: relative difference {rel:.2e}")
    assert rel < 2e-2  # bf16 rounding of the merged weights (2^-8 relative per weight)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 5 / 6


def test_missing_bitsandbytes_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    rc = main(["--load-in-4bit", "--max-steps", "1", "--output-dir", str(tmp_path / "o")])
    assert rc == 2 and "pip install bitsandbytes" in capsys.readouterr().err


def test_hvp_through_4bit_equals_hvp_of_dequantized_fp32_model():
    """Second-order optimizers over a 4-bit base: the Hessian-vector product through the NF4
    layers equals the fp32 model's with the same dequantized weights (2.8e-7 relative)."""
    from torch.autograd import grad
    q, _ = _lora_4bit("--optimizer", "sophiah", "--target-modules", "q_proj,v_proj")
    f = train.add_lora(train.load_model(build_parser().parse_args(
        ["--optimizer", "sophiah", "--lora-r", "4", "--target-modules", "q_proj,v_proj"]), CPU)[0],
        _args("--optimizer", "sophiah", "--target-modules", "q_proj,v_proj"))
    f.load_state_dict({k: v for k, v in q.state_dict().items() if "lora_" in k}, strict=False)
    mods = dict(f.base_model.model.named_modules())
    with torch.no_grad():
        for k, w in qlora.dequantized_weights(q).items():
            k = k.replace("base_model.model.", "").replace(".base_layer", "")
            m = mods[k]
            (m.base_layer if hasattr(m, "base_layer") else m).weight.copy_(w)
    batch = _batch(q.config.vocab_size)

    def hvp(pm):
        ps = [p for p in pm.parameters() if p.requires_grad]
        gs = grad(pm(**batch).loss, ps, create_graph=True)
        v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(ps)]
        return torch.cat([h.flatten() for h in grad(gs, ps, v)])
    hq, hf = hvp(q), hvp(f)
    err = float((hq - hf).norm() / hf.norm())
    print(f"hvp 4-bit vs dequantized fp32: relative difference {err:.3g}")
    assert err < 1e-3
