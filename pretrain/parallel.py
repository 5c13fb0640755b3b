"""Process-group start-up for a parallel layout (model/config.py: ParallelConfig), from torchrun's
or Slurm's environment. Importing it imports no torch: the supervisor (pretrain/watchdog.py) reads
Slurm's environment from here."""

from __future__ import annotations

import contextlib
import datetime
import os

from model.config import ParallelConfig  # noqa: F401  (the layout, re-exported for callers)


def slurm_environment(env=None) -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from a Slurm task's environment
    (srun, one task per GPU), for what torchrun would have set. Empty outside Slurm or when they
    are set already. The master is the job's first node; the port is derived from the job id."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        out["MASTER_ADDR"] = first_host(nodes)
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[:nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_s: int = 600) -> None:
    """Start torch.distributed (NCCL with CUDA, gloo without) and Megatron-Core's process groups.

    `timeout_s`: how long a collective may wait (the default group's and Megatron's groups'); a
    backstop behind the watchdog (pretrain/watchdog.py), which ends a hung run sooner.

    Reads the usual RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (torchrun sets
    them), or Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and node list under srun;
    without either it starts a world of one.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from model import cpu_support

    cpu_support.install()
    if not dist.is_initialized():
        os.environ.update(slurm_environment())
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # a world of one needs no rendezvous: an in-process store, no TCP port to pick (and lose to
        # another process between the pick and the bind)
        store = dist.HashStore() if world == 1 and "MASTER_PORT" not in os.environ else None
        if store is None:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, store=store,
                                timeout=datetime.timedelta(seconds=timeout_s))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor,
            pipeline_model_parallel_size=parallel.pipeline,
            virtual_pipeline_model_parallel_size=parallel.virtual_stages if parallel.virtual_stages > 1 else None,
            context_parallel_size=parallel.context,
            expert_model_parallel_size=parallel.expert,
            expert_tensor_parallel_size=parallel.expert_tensor,
            distributed_timeout_minutes=max(1, round(timeout_s / 60)),
        )
    model_parallel_cuda_manual_seed(seed)


def shutdown_distributed() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def single_process():
    """A world of one for tools that need Megatron's process groups but no peers (model-info)."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    if started:
        os.environ.update(RANK="0", WORLD_SIZE="1")
        os.environ.pop("MASTER_PORT", None)  # an in-process store (init_distributed)
    try:
        init_distributed(ParallelConfig())
        yield
    finally:
        if started:
            shutdown_distributed()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
