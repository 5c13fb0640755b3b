"""Run a function in N fresh gloo processes (a world of N on this machine) and collect results."""

import os
import traceback

import torch
import torch.multiprocessing as mp

from pretrain.parallel import free_port


def _entry(rank, world, port, out_dir, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = fn(rank, *args)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    torch.save({"result": result}, os.path.join(out_dir, f"{rank}.pt"))


def run(fn, world: int, *args, out_dir: str):
    """fn(rank, *args) on `world` processes; returns the list of per-rank results."""
    os.makedirs(out_dir, exist_ok=True)
    try:
        mp.start_processes(_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world,
                           join=True, start_method="spawn")
    except mp.ProcessRaisedException:
        pass  # the worker's own traceback is reported below
    results = []
    for r in range(world):
        got = torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)
        if "error" in got:
            raise AssertionError(f"rank {r} of {world} failed:\n{got['error']}")
        results.append(got["result"])
    return results
