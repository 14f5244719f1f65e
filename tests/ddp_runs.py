"""Two gloo processes on CPU for the optimizers' DDP tests: each runs ``train(rank)`` inside a
process group and returns what it wants compared; the caller gets both ranks' results."""
from __future__ import annotations

import os
import tempfile

import torch


def _worker(rank: int, world: int, init_file: str, out_dir: str, train) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(train(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_ranks(train) -> tuple:
    """``(train(0), train(1))`` computed by two DDP ranks; ``train`` must be a module-level
    function (it is pickled into the spawned processes)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp, train), nprocs=2, join=True)
        return tuple(torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in (0, 1))
