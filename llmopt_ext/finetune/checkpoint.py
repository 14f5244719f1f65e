"""Resumable checkpoints of a fine-tuning run: trainable parameters, optimizer, scheduler and
GradScaler state, the batch stream's position and the RNG states.

One file, ``state.safetensors``: every tensor (parameters, optimizer state, RNG states) is a
safetensors entry with a readable key (``params/<name>``, ``optimizer/state/3/exp_avg``), and
everything else (step, loss history, param_groups, scheduler and stream state, Python's RNG
state, the run's configuration) is JSON in the file's metadata. Loading never unpickles, so a
crafted checkpoint cannot run code; the older pickle format (``state.pt``) is refused.

The file is written to a temporary file in the same directory, fsynced, renamed over the old
one and the directory fsynced: a crash leaves either the old checkpoint or the new one.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile

import torch

from .optimizers import UsageError

FILE = "state.safetensors"
LEGACY_FILE = "state.pt"
META_KEY = "llmopt_checkpoint"
FORMAT = 1


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ durable writes

def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that a crash or a failure leaves either the old file or
    the new one, never a partial file nor a stray temporary."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would stick after the rename
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(d: str) -> None:
    """Makes a rename in ``d`` durable (the directory entry, not only the file's data)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------- tensors + JSON, no pickle

def _encode(obj, path: str, tensors: dict):
    """A JSON-able tree for ``obj``; tensors go to ``tensors`` under their path. Dicts keep
    their key types (optimizer state is keyed by int) and tuples stay tuples."""
    if isinstance(obj, torch.Tensor):
        key = path
        while key in tensors:  # e.g. int key 3 and str key "3" in one dict
            key += "_"
        t = obj.detach().cpu()
        tensors[key] = t.contiguous().clone()  # safetensors: contiguous, no shared storage
        if t.is_contiguous() or 0 in t.stride():
            return {"t": key}
        # the layout is restored on load: e.g. TRCG's gradient-shaped EMAs have transposed
        # strides, and its foreach norms summed in another order drifted ~1e-7 after a resume
        return {"t": key, "stride": list(t.stride())}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"checkpoint: key {k!r} at {path} is not a str/int/float/bool")
        return {"d": [[k, _encode(v, f"{path}/{k}" if path else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return {"u": items} if isinstance(obj, tuple) else {"l": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: {path} is a {type(obj).__name__}, which a checkpoint does not "
                    "store (tensors, numbers, strings, lists, tuples and dicts only)")


def _decode(node, tensors: dict):
    if not isinstance(node, dict):
        return node
    if "t" in node:
        t = tensors[node["t"]]
        if "stride" in node:
            t = torch.empty_strided(t.shape, node["stride"], dtype=t.dtype).copy_(t)
        return t
    (tag, val), = node.items()
    if tag == "d":
        return {k: _decode(v, tensors) for k, v in val}
    if tag == "l":
        return [_decode(v, tensors) for v in val]
    if tag == "u":
        return tuple(_decode(v, tensors) for v in val)
    raise ValueError(f"unknown node tag {tag!r}")


def encode_state(state: dict) -> bytes:
    from safetensors.torch import save
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    meta = json.dumps({"format": FORMAT, "tree": tree})
    return save(tensors, metadata={META_KEY: meta})


def decode_state(f: str) -> dict:
    """The state in checkpoint file ``f``; any problem with the file is one UsageError."""
    from safetensors import safe_open
    try:
        if os.path.getsize(f) == 0:
            raise ValueError("the file is empty")
        with safe_open(f, framework="pt", device="cpu") as s:
            meta = (s.metadata() or {}).get(META_KEY)
            if meta is None:
                raise ValueError("no llmopt checkpoint metadata (not written by llmopt-finetune)")
            tensors = {k: s.get_tensor(k) for k in s.keys()}
        doc = json.loads(meta)
        if doc.get("format") != FORMAT:
            raise ValueError(f"checkpoint format {doc.get('format')!r}, this version reads {FORMAT}")
        state = _decode(doc["tree"], tensors)
        for k in ("step", "params", "optimizer", "stream", "history", "rng"):
            if k not in state:
                raise ValueError(f"missing entry {k!r}")
        return state
    except Exception as e:  # a truncated, empty or foreign file: one message naming it
        raise UsageError(f"--resume: {f} is not a readable llmopt-finetune checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it is "
                         "truncated, corrupted or not a checkpoint") from None


# --------------------------------------------------------------------- save / load

def save_checkpoint(path, model, opt, scaler, stream, step, history, extra=None,
                    config=None) -> None:
    os.makedirs(path, exist_ok=True)
    state = {"step": step, "params": {n: p for n, p in trainable(model).items()},
             "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "stream": stream.state_dict(), "history": list(history),
             "extra": extra or {}, "config": config or {},
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    atomic_write_bytes(os.path.join(path, FILE), encode_state(state))


def config_differences(saved: dict, current: dict) -> list[str]:
    """One line per option whose value differs between the checkpoint and this command."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<unset>"), current.get(k, "<unset>")
        if a != b:
            out.append(f"--{k.replace('_', '-')}: checkpoint {a!r}, this command {b!r}")
    return out


def load_checkpoint(path, model, opt, scaler, stream, config=None) -> tuple[int, list, dict]:
    """Restores the run in checkpoint directory ``path``; returns (step, history, extra).
    With ``config``, the checkpoint's configuration must equal it (each difference is named)."""
    f = os.path.join(path, FILE)
    if not os.path.exists(f):
        if os.path.exists(os.path.join(path, LEGACY_FILE)):
            raise UsageError(f"--resume {path}: {LEGACY_FILE} is an older pickle-format checkpoint, "
                             "which is not loaded (unpickling a file can run arbitrary code); "
                             f"this version writes {FILE}")
        raise UsageError(f"--resume {path}: no checkpoint ({FILE}) there")
    ck = decode_state(f)
    if config is not None:
        diff = config_differences(ck["config"], config)
        if diff:
            raise UsageError(f"--resume {path}: the checkpoint was written with other options; "
                             "rerun with the checkpoint's values (or start a new run):\n  "
                             + "\n  ".join(diff))
    params = trainable(model)
    missing = set(params) ^ set(ck["params"])
    if missing:
        raise UsageError(f"--resume {path}: the checkpoint's trainable parameters do not match "
                         f"this model/LoRA configuration (e.g. {sorted(missing)[:3]})")
    for n, p in params.items():
        if tuple(ck["params"][n].shape) != tuple(p.shape):
            raise UsageError(f"--resume {path}: parameter {n} has shape "
                             f"{tuple(ck['params'][n].shape)} in the checkpoint, {tuple(p.shape)} here")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ck["params"][n])
    opt.load_state_dict(ck["optimizer"])
    if scaler and ck["scaler"]:
        scaler.load_state_dict(ck["scaler"])
    stream.load_state_dict(ck["stream"])
    torch.set_rng_state(ck["rng"]["torch"])
    random.setstate(ck["rng"]["python"])
    if ck["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["step"], list(ck["history"]), ck.get("extra", {})
