"""Run a function in N fresh gloo processes (a world of N on this machine) and collect results."""

import os
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now for a rendezvous, chosen below the kernel's ephemeral range: gloo and NCCL
    open many connections from that range, and one of them may take a port picked from it between
    the pick and the store's bind (EADDRINUSE; `run` retries then). The training runs of the tests
    need none: torchrun --standalone binds its own, a world of one uses an in-process store."""
    import random

    low, high = 20000, _ephemeral_start()
    for port in random.sample(range(low, high), min(64, max(high - low, 0))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no range below the ephemeral one: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def run(fn, world: int, *args, out_dir: str, timeout: float = 600):
    """fn(rank, *args) on `world` processes; returns the list of per-rank results. A rendezvous port
    taken between its pick and its bind (another test's processes) is retried with another."""
    for attempt in range(3):
        try:
            return _run(fn, world, *args, out_dir=out_dir, timeout=timeout)
        except AssertionError as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
            for name in os.listdir(out_dir):
                os.remove(os.path.join(out_dir, name))


def _run(fn, world: int, *args, out_dir: str, timeout: float = 600):
    """fn(rank, *args) on `world` processes; returns the list of per-rank results. A world that
    has not finished after `timeout` seconds (a collective some rank never joins) is killed and
    reported, never left to hang the suite."""
    os.makedirs(out_dir, exist_ok=True)
    context = mp.start_processes(_entry, args=(world, free_port(), out_dir, fn, args), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise AssertionError(f"{fn.__name__} on {world} processes did not finish in {timeout} s "
                                     "(a hang: some rank waits in a collective the others never reach)")
    except mp.ProcessRaisedException:
        pass  # the worker's own traceback is reported below
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    results = []
    for r in range(world):
        got = torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)
        if "error" in got:
            raise AssertionError(f"rank {r} of {world} failed:\n{got['error']}")
        results.append(got["result"])
    return results
