"""Optimizer state as Megatron dist-checkpointing ShardedTensors, independent of the layout.

Each state tensor is saved under `optimizer.<state>.<whole-model name>` with the global shape of
the whole parameter, each rank writing the piece it owns: its tensor-parallel shard (a gated
gate/up weight as separate gate and up tensors, so the pieces stay contiguous), only on the
data-parallel rank that owns the parameter. Global layer and expert ids in the names make the
checkpoint readable under another tensor, expert or data-parallel layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing import ShardedTensor

from model import sharding

_PREFIX = "optimizer"


def _pieces(role, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor, tuple]]:
    """(key suffix, local tensor, (axis, rank, size) or ()) for one state tensor of `role`.

    A gate/up weight is always stored as separate gate and up tensors, whatever the layout, so
    that a tensor-parallel piece ([gate shard; up shard]) maps to two contiguous pieces."""
    split = ()
    if role.tp_dim is not None:
        rank, size, _ = sharding.tp_split(role.name)
        split = (role.tp_dim, rank, size)
    if sharding.is_gated(role.name):
        gate, up = tensor.chunk(2, role.tp_dim or 0)
        return [(".gate", gate, split), (".up", up, split)]
    return [("", tensor, split)]


def sharded_state_dict(optimizer) -> dict:
    """This rank's optimizer state for `megatron.core.dist_checkpointing.save/load`.

    Loading fills the same tensors in place; call `load_sharded_state_dict` with the result.
    """
    tp_rank = ps.get_tensor_model_parallel_rank() if dist.is_initialized() else 0
    tensors = {}
    for role in optimizer.mine:
        # A dense weight every tensor-parallel rank holds whole (a norm, the router) is the same
        # on all of them: tensor-parallel rank 0 writes it.
        replica = tp_rank if (role.tp_dim is None and not role.expert) else 0
        if getattr(role.param, "shared", False):
            # the word embedding Megatron duplicates on the last pipeline stage for MTP: the same
            # state as the first stage's, which writes it
            replica = 1 + replica
        for state_name, t in optimizer.state[role.name].items():
            for suffix, piece, split in _pieces(role, t):
                key = f"{_PREFIX}.{state_name}.{role.name}{suffix}"
                tensors[key] = ShardedTensor.from_rank_offsets(key, piece, *([split] if split else []),
                                                               replica_id=replica)
    return {f"{_PREFIX}.tensors": tensors,
            f"{_PREFIX}.steps": optimizer.steps,
            f"{_PREFIX}.skipped_in_a_row": optimizer.skipped_in_a_row}


def load_sharded_state_dict(optimizer, loaded: dict) -> None:
    """Take the result of `dist_checkpointing.load(sharded_state_dict(optimizer), ...)`."""
    tensors = loaded[f"{_PREFIX}.tensors"]
    for role in optimizer.mine:
        for state_name, t in optimizer.state[role.name].items():
            pieces = [tensors[f"{_PREFIX}.{state_name}.{role.name}{s}"] for s, _, _ in _pieces(role, t)]
            t.copy_(torch.cat(pieces, role.tp_dim or 0) if len(pieces) > 1 else pieces[0])
    optimizer.steps = int(loaded[f"{_PREFIX}.steps"])
    optimizer.skipped_in_a_row = int(loaded[f"{_PREFIX}.skipped_in_a_row"])
