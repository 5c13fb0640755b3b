"""Whole-model tensors <-> what one rank holds under tensor, expert and pipeline parallelism.

Whole-model names are the local layer spec's with global layer and expert ids (the names used by
`model/hf_mapping.py`). How a tensor is split is read off the parameter itself: Megatron marks
tensor-parallel weights with `tensor_model_parallel` and `partition_dim`; routed-expert weights
are split over the expert-tensor-parallel group instead.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

# Transformer Engine names -> local spec names (TE fuses the pre-norms into the next linear and
# keeps the experts of a layer in one grouped module with numbered weights).
_TE_RENAMES = [
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"mlp\.experts\.(linear_fc[12])\.weight(\d+)$"), r"mlp.experts.local_experts.\2.\1.weight"),
]
_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def tp_split(whole_name: str) -> tuple[int, int, object]:
    """(rank, size, group) of the tensor-parallel split that applies to this parameter."""
    # By name: Megatron marks expert weights (allreduce=False) only when expert parallelism is on.
    if ".mlp.experts." in whole_name:
        return (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                ps.get_expert_tensor_parallel_group())
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group())


def _experts_per_rank(model) -> int:
    return model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()


def whole_name(local: str, model) -> str:
    """This rank's state-dict name -> the whole-model name (global layer and expert ids)."""
    for pattern, repl in _TE_RENAMES:
        local = pattern.sub(repl, local)
    m = _DECODER_LAYER.match(local)
    if m:
        vp_stage = getattr(model, "vp_stage", None) if model.config.virtual_pipeline_model_parallel_size else None
        offset = get_transformer_layer_offset(model.config, vp_stage=vp_stage)
        local = f"decoder.layers.{int(m.group(1)) + offset}." + local[m.end():]
    m = _LOCAL_EXPERT.search(local)
    if m:
        e = ps.get_expert_model_parallel_rank() * _experts_per_rank(model) + int(m.group(1))
        local = local[:m.start()] + f".mlp.experts.local_experts.{e}." + local[m.end():]
    return local


def expert_id(name: str) -> int | None:
    """The routed expert a parameter belongs to (its id as the name gives it), or None."""
    m = _LOCAL_EXPERT.search(name)
    return int(m.group(1)) if m else None


def is_gated(whole_name: str) -> bool:
    # SwiGLU fc1 holds [gate; up]; each tensor-parallel rank holds [gate shard; up shard].
    return whole_name.endswith("linear_fc1.weight")


def shard(whole: torch.Tensor, name: str, like) -> torch.Tensor:
    """This rank's piece of whole tensor `name`, split the way parameter/buffer `like` is split."""
    if not getattr(like, "tensor_model_parallel", False):
        return whole
    rank, size, _ = tp_split(name)
    dim = like.partition_dim
    if is_gated(name):
        return torch.cat([h.chunk(size, dim)[rank] for h in whole.chunk(2, dim)], dim)
    return whole.chunk(size, dim)[rank]


def unshard(piece: torch.Tensor, name: str, like) -> torch.Tensor:
    """The whole tensor from this rank's piece (collective over the tensor-parallel group).

    `name` is the whole-model name."""
    if not getattr(like, "tensor_model_parallel", False):
        return piece
    _, size, group = tp_split(name)
    if size == 1:
        return piece
    pieces = [torch.empty_like(piece) for _ in range(size)]
    dist.all_gather(pieces, piece.contiguous(), group=group)
    return join_pieces(pieces, name, like.partition_dim)


def join_pieces(pieces: list[torch.Tensor], name: str, dim: int) -> torch.Tensor:
    """The whole tensor from every tensor-parallel rank's piece, in rank order (the inverse of shard)."""
    if is_gated(name):
        halves = [p.chunk(2, dim) for p in pieces]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
    return torch.cat(pieces, dim)


def _local_items(model):
    for name, t in model.state_dict(keep_vars=True).items():
        if not name.endswith("_extra_state"):
            yield name, t


def chunks_of(model) -> list:
    """A model chunk, or a list of them (virtual pipeline stages), as a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


@torch.no_grad()
def load_whole_state(model, whole: Mapping[str, torch.Tensor]) -> None:
    """Copy a whole-model state dict into this rank's parameters and buffers (`model`: a chunk or
    a list of chunks)."""
    if isinstance(model, (list, tuple)):
        for chunk in model:
            load_whole_state(chunk, whole)
        return
    missing = []
    for name, t in _local_items(model):
        key = whole_name(name, model)
        if key not in whole:
            missing.append(key)
            continue
        piece = shard(whole[key], key, t)
        if piece.shape != t.shape:
            raise ValueError(f"{key}: whole tensor {tuple(whole[key].shape)} gives a piece of "
                             f"{tuple(piece.shape)} on this rank, but the model holds {tuple(t.shape)}")
        t.copy_(piece)
    if missing:
        raise KeyError(f"{len(missing)} model weights missing from the state (first: {missing[:3]})")


@torch.no_grad()
def gather_whole(model, value: Callable[[torch.Tensor], torch.Tensor | None] = lambda t: t) -> dict[str, torch.Tensor]:
    """Whole-model tensors of this pipeline stage, on every rank (collective over TP and EP groups).

    `value(param)` picks what to gather: the tensor itself by default, or e.g. its gradient.
    Tensors for which it returns None are left out (a parameter without gradient).
    `model`: a chunk or a list of chunks (virtual pipeline stages).
    """
    if isinstance(model, (list, tuple)):
        return {k: v for chunk in model for k, v in gather_whole(chunk, value).items()}
    out = {}
    ep_size = ps.get_expert_model_parallel_world_size()
    for name, t in _local_items(model):
        v = value(t)
        if v is None:
            continue
        key = whole_name(name, model)
        whole = unshard(v.detach(), key, t)
        expert = _LOCAL_EXPERT.search(key)  # on the whole name, so TE's grouped experts match too
        if expert and ep_size > 1:
            # Each expert-parallel rank holds different experts: gather them all, by global id.
            pieces = [torch.empty_like(whole) for _ in range(ep_size)]
            dist.all_gather(pieces, whole.contiguous(), group=ps.get_expert_model_parallel_group())
            per_rank = _experts_per_rank(model)
            local_id = int(expert.group(1)) - ps.get_expert_model_parallel_rank() * per_rank
            for r, p in enumerate(pieces):
                out[_LOCAL_EXPERT.sub(f".mlp.experts.local_experts.{r * per_rank + local_id}.", key)] = p
        else:
            out[key] = whole
    return out
