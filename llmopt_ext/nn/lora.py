"""peft integration of the fused LoRA Linear.

* :class:`LoraLinear` subclasses ``peft.tuners.lora.layer.Linear``: peft's state, adapter
  switching, ``merge``/``unmerge``/``safe_merge``, saving and loading are peft's own; only
  ``forward`` (and the merge arithmetic) change. It reports itself as peft does (repr
  ``lora.Linear(...)``, so get_layer_status()'s module_type is peft's). The fused op runs the
  base layer and the first active adapter (``lora_bias`` folded into the op's bias, which is
  differentiable); further active adapters add peft's own low-rank term. DoRA
  (``use_dora=True``) runs fused when it is the first active adapter (autocast too): the
  weight norm ``||W + s B A||`` per output row in low rank (:func:`llmopt_ext.ops.lora.dora_weight_norm`,
  ``||W_j||^2`` cached), the fused op, then peft's per-column rescaling by ``m / norm`` in
  one float32 pass (:meth:`LoraLinear._dora_forward` has the algebra, with dropout too). A
  configuration the fused path does not cover — the other variants (BD-LoRA, VeLoRA, KaSA,
  MonteCLoRA, MiCA, aLoRA, Arrow), a DoRA adapter after another active adapter, a mixed
  ``adapter_names`` batch, merged or disabled adapters, a base layer that is another
  adapter's layer (mixed models), an x dtype other than the weight's outside autocast —
  runs peft's exact forward. Under
  ``torch.autocast`` (bf16/fp16) x, the base weight and bias are cast to the autocast dtype,
  as autocast does for peft's base ``F.linear``, and the fused op runs with autocast off on
  those inputs and the adapters in their own dtype (fp32 adapters stay fp32, where autocast
  would round them to bf16). Every fallback is counted (:func:`fallback_counts`) and the
  first of each reason is reported with a warning; it is never silent. Fused calls are
  counted too (:func:`fused_counts`).
* :func:`use_fused_lora` registers the fused layer through peft's custom-module dispatch
  (``LoraConfig._register_custom_module``, peft 0.21). Its factory only takes plain
  ``nn.Linear`` / transformers ``Conv1D`` targets (exact type): bitsandbytes' 4/8-bit
  Linear subclass ``nn.Linear`` and still go to peft's own dispatchers, and so do
  ``target_parameters`` (peft's ParamWrapper) and targets that are another tuner's layer.
* :func:`fuse_lora` swaps the LoRA Linear layers of an already built PeftModel in place.

Adapters are saved with peft's keys and config, so they load into plain peft and back.
The custom-module mapping is not saved in ``adapter_config.json``: to load into fused
layers pass ``config=use_fused_lora(LoraConfig.from_pretrained(path))`` to
``PeftModel.from_pretrained``, or call :func:`fuse_lora` after loading.
"""
from __future__ import annotations

import collections
import contextlib
import warnings
from typing import Any, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora import layer as peft_layer
from peft.tuners.lora import variants as peft_variants
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.nn import functional as F

from ..ops import lora as lora_ops

try:  # GPT-2 style (in, out) weights: fan_in_fan_out
    from transformers.pytorch_utils import Conv1D
except Exception:  # noqa: BLE001 - transformers is optional
    Conv1D = None

_FALLBACKS: collections.Counter = collections.Counter()
_FUSED: collections.Counter = collections.Counter()
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fallback_counts() -> dict[str, int]:
    """Reason -> how many forward calls of fused layers ran peft's forward instead."""
    return dict(_FALLBACKS)


def reset_fallback_counts() -> None:
    _FALLBACKS.clear()


def fused_counts() -> dict[str, int]:
    """Kind ("1 adapter", "2 adapters, lora_bias", ...) -> how many forward calls of fused
    layers ran the fused op (eager calls; a compiled graph is counted when traced, not run)."""
    return dict(_FUSED)


def reset_fused_counts() -> None:
    _FUSED.clear()


def _record_fused(names: list[str], lora_B: nn.ModuleDict, dora: bool = False) -> None:
    if torch.compiler.is_compiling():  # a counter update would break a fullgraph trace
        return
    kind = f"{len(names)} adapter{'s' if len(names) > 1 else ''}"
    if dora:
        kind += ", DoRA"
    if any(lora_B[n].bias is not None for n in names):
        kind += ", lora_bias"
    _FUSED[kind] += 1


@torch.compiler.disable
def _record_fallback(reason: str) -> None:
    first = reason not in _FALLBACKS
    _FALLBACKS[reason] += 1
    if first:
        warnings.warn(
            f"llmopt_ext.nn.LoraLinear: running peft's unfused forward ({reason}); later "
            "fallbacks for this reason are counted in llmopt_ext.nn.fallback_counts()",
            RuntimeWarning,
            stacklevel=3,
        )


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype that applies to x's device (bf16/fp16), or None."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    dt = torch.get_autocast_dtype(kind)
    return dt if dt in (torch.bfloat16, torch.float16) else None


def _dropout_p(module: nn.Module) -> Optional[float]:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    return None


class _DoraMix(torch.autograd.Function):
    """``y = y_base + (g - 1) * u + g * lr`` (peft's DoRA output with dropout) for y_base, u
    (..., out) in x's dtype, lr (..., out) in the adapter dtype and g (out,) float32; float32
    arithmetic, one rounding to y_base's dtype. Where g == 1 and lr == 0 (initialisation) y is
    y_base exactly. ``v = u + lr`` (x's dtype, made by the caller with autograd ops) is an
    input only to be saved for g's gradient (it gets none itself): saved as an input, it keeps
    its graph, so double backward differentiates g's gradient through u and lr; the rest of
    the backward is differentiable ops too."""

    @staticmethod
    def forward(ctx, y_base, u, lr, g, v):
        ctx.save_for_backward(v, g)
        ctx.dtypes = (u.dtype, lr.dtype)
        y = y_base.to(torch.float32) + (g - 1.0) * u.to(torch.float32) + g * lr.to(torch.float32)
        return y.to(y_base.dtype)

    @staticmethod
    def backward(ctx, dy):
        v, g = ctx.saved_tensors
        need = ctx.needs_input_grad
        d32 = dy.to(torch.float32)
        du = ((g - 1.0) * d32).to(ctx.dtypes[0]) if need[1] else None
        dlr = (g * d32).to(ctx.dtypes[1]) if need[2] else None
        dg = (d32 * v.to(torch.float32)).reshape(-1, v.shape[-1]).sum(0) if need[3] else None
        return dy if need[0] else None, du, dlr, dg, None


class _DoraRescale(torch.autograd.Function):
    """``y = y0 + (g - 1) * (y0 - bias)`` (peft's form of the DoRA output without dropout) for
    y0 = ``x W^T + bias + s x A^T B^T`` (..., out) in x's dtype, g (out,) float32 and bias
    (out,) or None; float32 arithmetic, one rounding to y0's dtype. Where g == 1 (a DoRA
    adapter at its initialisation) y is y0 exactly. Saves y0 in its own dtype. The backward
    is made of differentiable ops (double backward works)."""

    @staticmethod
    def forward(ctx, y0, g, bias):
        y32 = y0.to(torch.float32)
        d = y32 - bias if bias is not None else y32
        ctx.save_for_backward(y0, g, bias)
        return (y32 + (g - 1.0) * d).to(y0.dtype)

    @staticmethod
    def backward(ctx, dy):
        y0, g, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy0 = dg = dbias = None
        if need[0]:
            dy0 = (dy * g).to(y0.dtype)
        if need[1]:
            d = y0.to(torch.float32) - bias if bias is not None else y0.to(torch.float32)
            dg = (dy.to(torch.float32) * d).reshape(-1, y0.shape[-1]).sum(0)
        if need[2] and bias is not None:
            dbias = ((1.0 - g) * dy.to(torch.float32).reshape(-1, y0.shape[-1]).sum(0)).to(bias.dtype)
        return dy0, dg, dbias


class LoraLinear(peft_layer.Linear):
    """peft's LoRA Linear whose forward runs :func:`llmopt_ext.ops.lora_linear`."""

    def _get_name(self) -> str:
        # nn.Module.__repr__ names the class through this; peft's get_layer_status() and
        # get_model_status() read module_type from the repr ("lora.Linear"), so the fused
        # layer reports what peft reports for its own layer (isinstance tells them apart).
        return "Linear"

    def _fused_adapters(self, x: torch.Tensor, args, kwargs) -> tuple[Optional[list[str]], str]:
        """(active adapter names, "") when the fused path applies, else (None, reason)."""
        if self.disable_adapters:
            return None, "adapters disabled"
        if kwargs.get("adapter_names") is not None:
            return None, "mixed adapter_names batch"
        if self.merged:
            return None, "merged adapters"
        if args or any(v is not None for v in kwargs.values()):
            return None, "extra forward arguments"
        if self.base_layer is not self.get_base_layer():
            # a mixed model stacks this LoRA over a LoHa/LoKr/AdaLoRA layer: peft calls that
            # wrapped layer (its adapter included), never the innermost Linear alone
            return None, f"base_layer is a {type(self.base_layer).__name__} adapter layer"
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return None, "no active adapter in this layer"  # peft runs the base layer alone
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype not in _FUSED_DTYPES or weight.dim() != 2:
            return None, "base weight not a float32/bfloat16/float16 matrix"
        amp = _autocast_dtype(x)  # under autocast x and W are both cast to its dtype
        if amp is None and x.dtype != weight.dtype:
            return None, f"x dtype {x.dtype} != weight dtype {weight.dtype}"
        compute = amp or x.dtype
        for i, name in enumerate(active):
            reason = self._adapter_reason(name, compute, first=i == 0)
            if reason:
                return None, reason
        return active, ""

    def _adapter_reason(self, name: str, compute: torch.dtype, first: bool = True) -> str:
        """Why adapter `name` cannot run fused with inputs in `compute` dtype ("" if it can);
        `first`: it is the first active adapter."""
        if name in self.lora_variant:
            if type(self.lora_variant[name]) is not peft_variants.DoraLinearVariant:
                return f"LoRA variant {type(self.lora_variant[name]).__name__}"
            reason = self._dora_reason(name, first)
            if reason:
                return reason
        adt = self.lora_A[name].weight.dtype
        if adt not in (torch.float32, compute) or self.lora_B[name].weight.dtype != adt:
            return f"adapter dtype {adt} (expected float32 or x's dtype)"
        if adt != compute and not getattr(self, "cast_input_dtype_enabled", True):
            return "input dtype casting disabled"
        bias = self.lora_B[name].bias
        if bias is not None and bias.dtype != adt:
            return f"lora_bias dtype {bias.dtype} != adapter dtype {adt}"
        if _dropout_p(self.lora_dropout[name]) is None:
            return f"dropout module {type(self.lora_dropout[name]).__name__}"
        return ""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names, reason = self._fused_adapters(x, args, kwargs)
        if names is None:
            _record_fallback(reason)
            return super().forward(x, *args, **kwargs)
        _record_fused(names, self.lora_B, dora=names[0] in self.lora_variant)
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias
        amp = _autocast_dtype(x)
        x_in = x
        with torch.autocast(x.device.type, enabled=False) if amp is not None else contextlib.nullcontext():
            if amp is not None:
                x, weight = x.to(amp), weight.to(amp)
                bias = bias.to(amp) if bias is not None else None
            first, s = names[0], self.scaling[names[0]]
            if first in self.lora_variant:  # DoRA (checked by _dora_reason)
                y = self._dora_forward(x, weight, bias, first, x_in)
                for name in names[1:]:
                    y = y + self._low_rank_term(x, name).to(y.dtype)
                return y
            lora_bias = self.lora_B[first].bias
            if lora_bias is not None:  # peft scales lora_B's bias with the adapter: y += s * b_B
                bias = s * lora_bias if bias is None else bias + s * lora_bias
                bias = bias.to(x.dtype)
            y = lora_ops.lora_linear(
                x, weight, bias, self.lora_A[first].weight, self.lora_B[first].weight,
                s, _dropout_p(self.lora_dropout[first]), self.training, self.fan_in_fan_out,
            )
            for name in names[1:]:  # further adapters: peft's own low-rank term, added
                y = y + self._low_rank_term(x, name).to(y.dtype)
        return y

    def _low_rank_term(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s * B(A(dropout(x)))`` (B's bias included) in the adapter dtype, as peft computes it."""
        x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]

    # ---- DoRA

    def _dora_reason(self, name: str, first: bool) -> str:
        """Why DoRA adapter `name` cannot run fused ("" if it can)."""
        if not first:  # peft rescales the output so far, earlier adapters' terms included
            return "DoRA adapter after the first active adapter"
        mag = self.lora_magnitude_vector[name].weight
        n_out = self.lora_B[name].weight.shape[0]
        if mag.dtype not in _FUSED_DTYPES or tuple(mag.shape) != (n_out,):
            return f"DoRA magnitude {mag.dtype} {tuple(mag.shape)} (expected a float ({n_out},) vector)"
        if mag.device != self.lora_A[name].weight.device:
            return f"DoRA magnitude on {mag.device}, adapter on {self.lora_A[name].weight.device}"
        return ""

    def clear_dora_cache(self) -> None:
        """Drops the cached ``||W_j||^2`` (recomputed at the next DoRA forward). Needed only
        after writing the base weight in place through ``.data`` (which bypasses the version
        counter the cache is keyed on); merge/unmerge clear it themselves."""
        self.__dict__.pop("_dora_wsq_cache", None)

    def _dora_weight_sq(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """``||W_j||^2`` (float32, (out,)), cached: W is frozen. The key holds W's storage
        address, version counter (bumped by every in-place write through the parameter,
        load_state_dict's included), shape, strides, dtype and device, so a changed or
        replaced W recomputes it. Not cached while torch.compile traces (None: computed)."""
        if torch.compiler.is_compiling():
            return None
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(), weight.dtype,
               weight.device, bool(self.fan_in_fan_out))
        cached = self.__dict__.get("_dora_wsq_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        value = lora_ops.weight_row_norm_sq(weight, self.fan_in_fan_out)
        self.__dict__["_dora_wsq_cache"] = (key, value)
        return value

    def _dora_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      name: str, x_in: torch.Tensor) -> torch.Tensor:
        """peft's DoRA output for adapter `name` (the first active one), fused. x, weight and
        bias are in the compute dtype (under autocast: cast to it); x_in is the layer's input
        as given (the dropout runs on it in the adapter dtype, as peft's does) and the norm
        uses the stored weight (peft's norm uses ``W.to(x.dtype)``, the uncast W under autocast).

        With ``g = m / ||W + s B A||`` per output row (m: ``lora_magnitude_vector``; the norm
        from :func:`llmopt_ext.ops.lora.dora_weight_norm`, low rank, detached, float32):

        * no dropout (eval, or p = 0): peft's ``base(x) + (g - 1) (base(x) - bias) + g s B A x``
          is ``y0 + (g - 1) (y0 - bias)`` with ``y0 = x W^T + bias + s x A^T B^T``: one fused
          ``lora_linear``, then the per-column rescaling in float32, rounded once. At
          initialisation (B = 0, m = peft's norm of W) g is exactly 1 and y is exactly y0.
        * dropout in training: peft applies the dropout to x for the whole DoRA term,
          ``y = base(x) + (g - 1) (x_d W^T) + g s B A x_d`` with ``x_d = dropout(x)``; the
          layer's own dropout module makes x_d (the same RNG draw as peft's, so a seed gives
          peft's mask) in the adapter dtype, ``s B A x_d`` is peft's own adapter call, the two
          base GEMMs (x and x_d, as peft's) run in x's dtype (peft runs the second one in the
          adapter dtype: its error is damped by g - 1), and the sum is one float32 pass
          rounded once. At initialisation y is exactly base(x), as peft's.

        Measured (bench/bench_lora.py --dora; 4096->4096, 256 tokens, r = 16, fp32, one
        thread of a shared 2-core CPU, indicative): fwd+bwd 0.99x the fused LoRA layer's
        (peft's DoRA 1.98x), 8.05 MB saved for backward (peft's 76.3 MB); dropout 0.1: 2.06x
        (two base GEMMs each way, as peft's; peft's DoRA 3.32x), 12.0 MB (peft's 80.3 MB).
        bf16 activations: 4.05 / 6.04 MB saved against peft's 38.2 / 40.2 MB (the times were
        not measurable on that AVX2 machine: a bf16 x @ W GEMM took 110 s).
        """
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        s, fif = self.scaling[name], self.fan_in_fan_out
        stored = self.get_base_layer().weight
        norm = lora_ops.dora_weight_norm(stored, lora_A, lora_B, s, fif, self._dora_weight_sq(stored))
        if lora_A.dtype != torch.float32:  # peft's norm is in the adapter dtype
            norm = norm.to(lora_A.dtype).to(torch.float32)
        g = self.lora_magnitude_vector[name].weight.to(torch.float32) / norm
        dropout = self.lora_dropout[name]
        if self.training and _dropout_p(dropout) > 0.0:
            x_d = dropout(self._cast_input_dtype(x_in, lora_A.dtype))
            lr = self.lora_B[name](self.lora_A[name](x_d)) * s
            w = weight.t() if fif else weight  # (out, in)
            y_base = F.linear(x, w, bias)
            u = F.linear(x_d.to(x.dtype), w)
            return _DoraMix.apply(y_base, u, lr, g, u + lr.to(u.dtype))
        y0 = lora_ops.lora_linear(x, weight, bias, lora_A, lora_B, s, 0.0, False, fif)
        return _DoraRescale.apply(y0, g, bias)

    # ---- merge / unmerge with one rounding (peft rounds the delta, then the sum: peft#1388)

    def _plain_merge_ok(self, name: str) -> bool:
        w = self.get_base_layer().weight
        return (name not in self.lora_variant and not self.lora_bias.get(name, False)
                and isinstance(w, torch.Tensor) and w.dtype in _FUSED_DTYPES
                and self.lora_A[name].weight.dtype in _FUSED_DTYPES
                and self.lora_A[name].weight.device == w.device)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self.clear_dora_cache()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            if not self._plain_merge_ok(name):
                super().merge(safe_merge=safe_merge, adapter_names=[name])
                continue
            w = self.get_base_layer().weight
            A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
            with torch.no_grad():
                if safe_merge:
                    merged = w.detach().clone()
                    lora_ops.lora_merge_(merged, A, B, s, self.fan_in_fan_out)
                    if not torch.isfinite(merged).all():
                        raise ValueError(
                            f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                    w.data = merged
                else:
                    lora_ops.lora_merge_(w.data, A, B, s, self.fan_in_fan_out)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        self.clear_dora_cache()
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            if name in self.lora_A and self._plain_merge_ok(name):
                self.merged_adapters.pop()
                with torch.no_grad():
                    lora_ops.lora_unmerge_(self.get_base_layer().weight.data, self.lora_A[name].weight,
                                           self.lora_B[name].weight, self.scaling[name], self.fan_in_fan_out)
            else:  # peft's own unmerge for this one adapter
                rest = self.merged_adapters[:-1]
                self.merged_adapters[:] = [name]
                super().unmerge()
                self.merged_adapters[:] = rest


def _is_plain(base: nn.Module) -> tuple[bool, bool]:
    """(takes it, is Conv1D): exact nn.Linear or transformers Conv1D only."""
    if type(base) is nn.Linear:
        return True, False
    if Conv1D is not None and type(base) is Conv1D:
        return True, True
    return False, False


def _factory(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs):
    if kwargs.get("parameter_name") is not None:
        return None  # target_parameters: peft's dispatch builds its ParamWrapper (or raises)
    if isinstance(target, BaseTunerLayer):
        return None  # stacking over another tuner's layer (mixed models): peft's layer calls it
    ok, conv1d = _is_plain(target)
    if not ok:
        return None  # e.g. bitsandbytes Linear4bit: peft's own dispatchers take it
    # the same fan_in_fan_out correction as peft's dispatch_default
    if conv1d and not config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                      "Setting fan_in_fan_out to True.")
        config.fan_in_fan_out = True
    if not conv1d and config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                      "Setting fan_in_fan_out to False.")
        config.fan_in_fan_out = False
    if conv1d:
        kwargs["is_target_conv_1d_layer"] = True
    return LoraLinear(target, adapter_name, config=config, **kwargs)


def use_fused_lora(config: LoraConfig) -> LoraConfig:
    """Registers the fused layer for ``nn.Linear`` (and ``Conv1D``) targets in ``config``
    (peft's custom-module dispatch, which runs before peft's own). Returns ``config``."""
    mapping = {nn.Linear: _factory}
    if Conv1D is not None:
        mapping[Conv1D] = _factory
    config._register_custom_module(mapping)
    return config


def fuse_lora(model: nn.Module) -> int:
    """Turns every peft ``lora.Linear`` (exact type) over a plain ``nn.Linear``/``Conv1D`` in
    ``model`` into :class:`LoraLinear`, in place (same parameters, buffers and state).
    Returns how many layers were swapped."""
    n = 0
    for module in model.modules():
        if (type(module) is peft_layer.Linear and module.base_layer is module.get_base_layer()
                and _is_plain(module.base_layer)[0]):
            module.__class__ = LoraLinear
            n += 1
    return n
