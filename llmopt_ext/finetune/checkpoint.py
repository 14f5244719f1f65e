"""Resumable checkpoints of a fine-tuning run: trainable parameters, optimizer, scheduler and
GradScaler state, the batch stream's position and the RNG states."""
from __future__ import annotations

import os
import random

import torch

from .optimizers import UsageError


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path, model, opt, scaler, stream, step, history, extra=None) -> None:
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "state.pt.tmp")
    torch.save({"step": step, "params": {n: p.detach().cpu() for n, p in trainable(model).items()},
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "stream": stream.state_dict(), "history": history, "extra": extra or {},
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               tmp)
    os.replace(tmp, os.path.join(path, "state.pt"))  # never a half-written checkpoint


def load_checkpoint(path, model, opt, scaler, stream) -> tuple[int, list, dict]:
    f = os.path.join(path, "state.pt")
    if not os.path.exists(f):
        raise UsageError(f"--resume {path}: no checkpoint (state.pt) there")
    ck = torch.load(f, map_location="cpu", weights_only=False)
    params = trainable(model)
    missing = set(params) ^ set(ck["params"])
    if missing:
        raise UsageError(f"--resume {path}: the checkpoint's trainable parameters do not match "
                         f"this model/LoRA configuration (e.g. {sorted(missing)[:3]})")
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
    return ck["step"], ck["history"], ck.get("extra", {})
