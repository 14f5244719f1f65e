"""TRCG step on a tiny Llama + LoRA: time per step broken into gradient, HVPs, vector ops,
host syncs and the trial evaluation; against a straightforward per-tensor Steihaug-CG in
llm-opt's style (a Python loop over tensors, a host sync per tensor per reduction, an extra
HVP for d'Hd), written here as the baseline. Both run the same CG iterations from the same
state on the same batch (no preconditioner, same tolerance and cap), so the ratio is the cost
of the implementation, not of the algorithm.

Also: the vector work of one CG iteration alone on 128 LoRA-shaped fp32 tensors (16x4096 and
4096x16) as TRCG issues it (3 fused launches, device-side step length, 1 sync) against the
per-tensor loop, torch._foreach_* and flat-buffer versions of bench_multi_tensor, and the
cost of one HVP by double backward vs forward-over-reverse.

    python -m bench.bench_trcg [--quick] [--device cuda]
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch

from llmopt_ext import ops
from llmopt_ext.optim import TRCG
from llmopt_ext.optim import trcg as trcg_mod
from llmopt_ext.optim.hvp import DoubleBackwardHVP, ForwardOverReverseHVP, math_sdpa

from .bench_multi_tensor import flat_impls, foreach_impls, lora_shapes, loop_impls
from . import harness
from .harness import Results, measure


# ---- model -----------------------------------------------------------------------------

def tiny_llama_lora(layers: int, hidden: int, device: torch.device, attn: str = "sdpa"):
    """LoRA (r=8) on q,k,v,o of every layer: 8 adapter tensors per layer (16 layers -> 128)."""
    import transformers  # noqa: PLC0415
    import peft  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=128)
    cfg._attn_implementation = attn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(cfg)
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    # LoRA B starts at zero, which makes the first HVPs degenerate: start from a trained-like state
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return model.to(device)


# ---- timers ----------------------------------------------------------------------------

class Timers:
    """Wall time per category; synchronises a GPU around each timed call (breakdown runs only)."""

    def __init__(self, device):
        self.device = device
        self.ms: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, key):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[key] = self.ms.get(key, 0.0) + (time.perf_counter() - t0) * 1e3
            self.count[key] = self.count.get(key, 0) + 1

    def wrap(self, fn, key):
        def wrapper(*a, **k):
            with self(key):
                return fn(*a, **k)
        return wrapper


@contextlib.contextmanager
def instrument_trcg(timers: Timers):
    """Patch TRCG's collaborators with timing wrappers (restored on exit)."""
    saved = {}

    def patch(obj, name, key):
        saved[(obj, name)] = getattr(obj, name)
        setattr(obj, name, timers.wrap(getattr(obj, name), key))

    from llmopt_ext.optim import steihaug as steihaug_mod  # the CG loop's vector ops live there
    for mod in (trcg_mod, steihaug_mod):
        for name in ("mt_dot", "mt_norm_sq", "mt_axpby_", "mt_cg_step_", "mt_cg_direction_"):
            if hasattr(mod, name):
                patch(mod, name, "vector_ops")
    patch(trcg_mod.TRCG, "_host", "syncs")
    patch(trcg_mod.TRCG, "_preconditioner", "vector_ops")
    patch(trcg_mod.DoubleBackwardHVP, "__init__", "gradient")
    patch(trcg_mod.DoubleBackwardHVP, "__call__", "hvps")
    try:
        yield
    finally:
        for (obj, name), fn in saved.items():
            setattr(obj, name, fn)


# ---- the baseline: per-tensor Steihaug CG in llm-opt's style --------------------------------

class PerTensorTR:
    """Trust-region Newton-CG written the straightforward way: Python loops over tensors,
    ``.item()`` per tensor per reduction, the boundary step by per-tensor dot products, the
    predicted reduction from an extra HVP (d'Hd), positive boundary root only."""

    def __init__(self, params, radius, max_cg_iters, timers=None, cg_tol=None):
        self.params = list(params)
        self.cg_tol = cg_tol or (lambda r0: min(0.5, math.sqrt(r0)) * r0)
        self.radius = radius
        self.max_cg_iters = max_cg_iters
        self.t = timers
        self.items = 0

    def _timed(self, key):
        return self.t(key) if self.t is not None else contextlib.nullcontext()

    def _dot(self, xs, ys):
        total = 0.0
        for x, y in zip(xs, ys):
            total += torch.sum(x * y).item()
            self.items += 1
        return total

    def _boundary(self, z, d):
        a, b, c = self._dot(d, d), 2 * self._dot(z, d), self._dot(z, z) - self.radius**2
        return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)

    def step(self, closure):
        self.items = 0
        self.iters = 0
        with torch.enable_grad(), math_sdpa():
            loss = closure()
            with self._timed("gradient"):
                grads = torch.autograd.grad(loss, self.params, create_graph=True)

        def hvp(v):
            with self._timed("hvps"):
                return torch.autograd.grad(grads, self.params, grad_outputs=v, retain_graph=True)

        with self._timed("vector_ops"):
            g = [x.detach() for x in grads]
            r = [x.clone() for x in g]
            d = [-x for x in r]
            z = [torch.zeros_like(x) for x in r]
            rr = self._dot(r, r)
            tol = self.cg_tol(math.sqrt(rr))
        for _ in range(self.max_cg_iters):
            hd = hvp(d)
            self.iters += 1
            with self._timed("vector_ops"):
                dhd = self._dot(d, hd)
                if dhd <= 0:
                    tau = self._boundary(z, d)
                    z = [zi + tau * di for zi, di in zip(z, d)]
                    break
                alpha = rr / dhd
                z_new = [zi + alpha * di for zi, di in zip(z, d)]
                if math.sqrt(self._dot(z_new, z_new)) >= self.radius:
                    tau = self._boundary(z, d)
                    z = [zi + tau * di for zi, di in zip(z, d)]
                    break
                z = z_new
                for ri, hi in zip(r, hd):
                    ri.add_(hi, alpha=alpha)
                rr_new = self._dot(r, r)
                if math.sqrt(rr_new) < tol:
                    break
                beta = rr_new / rr
                d = [-ri + beta * di for ri, di in zip(r, d)]
                rr = rr_new
        hz = hvp(z)  # the extra HVP for the model value
        with self._timed("vector_ops"):
            pred = -(self._dot(g, z) + 0.5 * self._dot(z, hz))
            backup = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                for p, zi in zip(self.params, z):
                    p.add_(zi)
        with torch.no_grad():
            new = closure().item()
        self.items += 1
        rho = (loss.item() - new) / pred
        self.items += 1
        if rho < 0.25:
            self.radius *= 0.25
        if rho <= 0.0:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)
        return loss


# ---- measurements ------------------------------------------------------------------------

def _cg_iteration_vector_work(device, quick):
    """One CG iteration's vector work as TRCG issues it vs the bench_multi_tensor baselines."""
    n, dim = (32, 1024) if quick else (128, 4096)
    shapes = lora_shapes(n, dim=dim)
    gen = torch.Generator().manual_seed(0)
    lists = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(4)]
    flat = [[torch.cat([t.reshape(-1) for t in lst])] for lst in lists]
    x, r, p, hp = lists

    def ours():
        php = ops.mt_dot(p, hp)
        alpha = torch.where(php > 0, (1e-3 / php).clamp(max=1e-3), torch.zeros_like(php))
        norms = ops.mt_cg_step_(x, r, p, hp, alpha)
        torch.cat([php.reshape(1), norms]).tolist()  # the one sync
        ops.mt_cg_direction_(p, r, 0.5)

    def baseline(impl, L):
        def fn():
            php = impl["dot"](L[2], L[3])
            impl["cg_step"](L[0], L[1], L[2], L[3], -1e-3)
            impl["cg_direction"](L[2], L[1], 0.5)
            return php
        return fn

    rows = {"trcg": measure(ours, device, max_reps=10 if quick else 30)["ms"]}
    for name, impl, L in (("loop", loop_impls(), lists), ("foreach", foreach_impls(), lists),
                          ("flat", flat_impls(), flat)):
        rows[name] = measure(baseline(impl, L), device, max_reps=10 if quick else 30)["ms"]
    return n, sum(a * b for a, b in shapes), rows


def run(device: torch.device, quick: bool = False) -> list[Results]:
    out = []
    # 1) one CG iteration's vector work
    res = Results("trcg_cg_iteration", device, title="TRCG: vector work of one CG iteration (HVP excluded)")
    res.notes.append("trcg = mt_dot + device-side step length + mt_cg_step_ + one sync + mt_cg_direction_; "
                     "loop/foreach/flat as in bench_multi_tensor (loop syncs per tensor)")
    n, numel, t = _cg_iteration_vector_work(device, quick)
    res.add(tensors=n, elements=numel, trcg_ms=t["trcg"], loop_ms=t["loop"], foreach_ms=t["foreach"],
            flat_ms=t["flat"], vs_loop=t["loop"] / t["trcg"], vs_foreach=t["foreach"] / t["trcg"],
            vs_flat=t["flat"] / t["trcg"])
    res.plot(["vs_loop", "vs_foreach", "vs_flat"], label=["tensors"], title="One CG iteration: speed-up")
    out.append(res)

    # 2) full steps on a tiny Llama + LoRA
    layers, hidden, seq, batch = (4, 64, 32, 4) if quick else (16, 64, 32, 4)
    model = tiny_llama_lora(layers, hidden, device)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (batch, seq), generator=gen).to(device)

    l2 = 10.0
    timers_now: list = [None]  # the Timers of the current breakdown run, if any

    def closure():
        tm = timers_now[0]
        key = "forward" if torch.is_grad_enabled() else "trial_eval"
        with tm(key) if tm is not None else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
            # L2 term: keeps the curvature positive along the CG directions, so that both
            # implementations run all `iters` CG iterations (no early negative-curvature exit)
            return loss + 0.5 * l2 * sum((p * p).sum() for p in params)

    start = [p.detach().clone() for p in params]
    iters = 10

    def reset():
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)

    # a radius the solve does not reach, fixed iteration count: both do `iters` CG iterations
    kw = dict(radius=1e3, max_radius=1e3, max_cg_iters=iters)

    def trcg_step(timers=None):
        reset()
        opt = TRCG(params, cg_tol=lambda r0: 0.0, **kw)
        ctx = instrument_trcg(timers) if timers is not None else contextlib.nullcontext()
        with ctx:
            opt.step(closure)
        return opt

    def base_step(timers=None):
        reset()
        b = PerTensorTR(params, kw["radius"], iters, timers, cg_tol=lambda r0: 0.0)
        b.step(closure)
        return b

    reps = 3 if quick else 5
    t_trcg = measure(trcg_step, device, min_reps=reps, max_reps=reps)["ms"]
    t_base = measure(base_step, device, min_reps=reps, max_reps=reps)["ms"]
    # breakdown runs (timers synchronise around every call: slower, for attribution only)
    bd = {}
    for name, fn in (("trcg", trcg_step), ("per_tensor", base_step)):
        acc: dict[str, float] = {}
        for _ in range(reps):
            tm = Timers(device)
            timers_now[0] = tm
            t0 = time.perf_counter()
            obj = fn(tm)
            total = (time.perf_counter() - t0) * 1e3
            for k, v in tm.ms.items():
                acc[k] = acc.get(k, 0.0) + v / reps
            acc["total"] = acc.get("total", 0.0) + total / reps
        timers_now[0] = None
        syncs = obj.last_stats["syncs"] if name == "trcg" else obj.items
        cg = obj.last_stats["cg_iters"] if name == "trcg" else obj.iters
        hvps = obj.last_stats["hvps"] if name == "trcg" else obj.iters + 1
        bd[name] = (acc, syncs, hvps, cg)
    res = Results("trcg_step", device, title="TRCG step on a tiny Llama + LoRA vs a per-tensor baseline")
    res.notes.append(f"Llama {layers} layers, hidden {hidden}, seq {seq}, batch {batch}; LoRA r=8 on q,k,v,o: "
                     f"{len(params)} tensors, {sum(p.numel() for p in params)} parameters; {iters} CG iterations")
    res.notes.append("step_ms: unsynchronised median of full steps; breakdown columns from separate runs that "
                     "synchronise around each call; syncs = host reads per step (trcg: 1 + CG iterations + 1; "
                     "per-tensor: one .item() per tensor per reduction)")
    res.notes.append(f"speedup (per-tensor / trcg step time, same run): {t_base / t_trcg:.2f}x")
    for name, step_ms in (("trcg", t_trcg), ("per_tensor", t_base)):
        acc, syncs, hvps, cg = bd[name]
        known = sum(acc.get(k, 0.0) for k in ("forward", "gradient", "hvps", "vector_ops", "syncs", "trial_eval"))
        res.add(impl=name, step_ms=step_ms, forward_ms=acc.get("forward", 0.0),
                gradient_ms=acc.get("gradient", 0.0), hvp_ms=acc.get("hvps", 0.0), cg_iters=cg, hvps=hvps,
                trial_eval_ms=acc.get("trial_eval", 0.0), vector_ops_ms=acc.get("vector_ops", 0.0), sync_ms=acc.get("syncs", 0.0),
                other_ms=acc["total"] - known, syncs=syncs, syncs_per_cg_iter=round(syncs / max(cg, 1), 1),
                vs_trcg=step_ms / t_trcg)
    res.plot(["forward_ms", "gradient_ms", "hvp_ms", "trial_eval_ms", "vector_ops_ms", "sync_ms", "other_ms"],
             label=["impl"], kind="value", xlabel="ms per step (breakdown runs)", title="TRCG step: where the time goes")
    out.append(res)

    # 3) one HVP by each method (eager attention: forward-over-reverse needs forward AD)
    res = Results("trcg_hvp", device, title="One Hessian-vector product on the tiny Llama + LoRA")
    vs = [torch.randn_like(p) for p in params]
    with math_sdpa():
        db = DoubleBackwardHVP(closure(), params)
        t_db = measure(lambda: db(vs), device, max_reps=10)["ms"]
        fr = ForwardOverReverseHVP(closure(), params, model, closure)
        t_fr = measure(lambda: fr(vs), device, max_reps=10)["ms"]
        t_grad = measure(lambda: torch.autograd.grad(closure(), params), device, max_reps=10)["ms"]
    res.add(gradient_ms=t_grad, double_backward_ms=t_db, forward_over_reverse_ms=t_fr,
            fwd_over_rev_vs_double_backward=t_fr / t_db)
    db.release()
    fr.release()
    out.append(res)
    return out


if __name__ == "__main__":
    harness.main(run, __doc__)
