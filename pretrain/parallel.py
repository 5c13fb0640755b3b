"""The parallel layout (tensor / expert / pipeline / context / data) and process-group start-up.

The layout is checked against the model and the world size before any process group exists, so
an impossible layout fails in seconds with a message that names the field.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch

from model.config import ConfigError, ModelConfig


@dataclass
class ParallelConfig:
    tensor: int = 1
    expert: int = 1
    expert_tensor: int = 1  # tensor parallelism inside each expert; 1 keeps experts whole
    pipeline: int = 1
    context: int = 1
    # Megatron-Core requires sequence parallelism for MoE with tensor > 1; it is on by default and
    # only takes effect when tensor > 1.
    sequence_parallel: bool = True

    def data(self, world_size: int) -> int:
        return world_size // (self.tensor * self.pipeline * self.context)

    def validate(self, model: ModelConfig, world_size: int | None = None,
                 source: str = "parallel") -> "ParallelConfig":
        def fail(field: str, why: str):
            raise ConfigError(f"{source}: parallel.{field}={getattr(self, field)!r} {why}")

        for f in ("tensor", "expert", "expert_tensor", "pipeline", "context"):
            if getattr(self, f) < 1:
                fail(f, "must be at least 1")
        tp = self.tensor
        checks = [
            ("tensor", model.num_attention_heads, "model.num_attention_heads"),
            ("tensor", model.num_query_groups, "model.num_query_groups"),
            ("tensor", model.ffn_hidden_size, "model.ffn_hidden_size"),
            ("tensor", model.vocab_size, "model.vocab_size"),
            ("expert", model.num_experts, "model.num_experts"),
            ("expert_tensor", model.moe_ffn_hidden_size, "model.moe_ffn_hidden_size"),
            ("pipeline", model.num_layers, "model.num_layers"),
        ]
        for field, total, name in checks:
            if total % getattr(self, field):
                fail(field, f"does not divide {name}={total}")
        if tp > 1 and model.num_experts and not self.sequence_parallel:
            fail("sequence_parallel", "must be true with tensor > 1: Megatron-Core requires it for MoE")
        if world_size is not None:
            dense = tp * self.pipeline * self.context
            if world_size % dense:
                raise ConfigError(f"{source}: world size {world_size} is not divisible by "
                                  f"tensor*pipeline*context={dense}")
            experts = self.expert * self.expert_tensor * self.pipeline
            if world_size % experts:
                raise ConfigError(f"{source}: world size {world_size} is not divisible by "
                                  f"expert*expert_tensor*pipeline={experts}")
        return self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_s: int = 600) -> None:
    """Start torch.distributed (NCCL with CUDA, gloo without) and Megatron-Core's process groups.

    Reads the usual RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (torchrun and the
    Slurm launcher set them); without them it starts a world of one.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from model import cpu_support

    cpu_support.install()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor,
            pipeline_model_parallel_size=parallel.pipeline,
            context_parallel_size=parallel.context,
            expert_model_parallel_size=parallel.expert,
            expert_tensor_parallel_size=parallel.expert_tensor,
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
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_PORT=str(free_port()))
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
