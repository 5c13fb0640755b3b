"""Context parallelism on the PyTorch path (no Transformer Engine): how a sequence is split over the
context-parallel (CP) ranks, the keys and values every rank attends to, and MTP's token count.

Megatron's layout, which its RoPE (`get_pos_emb_on_this_cp_rank`) and MTP (`roll_tensor`) assume: a
sequence of S tokens is cut into 2N chunks of S / 2N; CP rank r keeps chunks r and 2N-1-r, in that
order, so every rank holds as much causal attention work as any other. Tokens, labels, loss mask
and position ids are split that way (`split_batch`); a packed row's segment ids stay whole, since
the keys span the whole sequence.

Attention (model/attention.py): queries stay on their rank; keys and values (GQA's few KV heads:
small) are all-gathered over the CP group and put in sequence order (`gather_keys_values`), whose
backward reduce-scatters their gradients (Megatron's sequence-parallel gather, given the CP group);
the mask comes from global positions (`positions`): causal, and the same document for packed rows.
The gathered keys and values live inside a recomputed region only: the core attention is
checkpointed under CP unless the whole layer is (pretrain/stages.py), so its backward gathers again.

What Megatron-Core 0.16 does by itself under CP, and this module does not repeat: RoPE for this
rank's positions; MTP's shift of labels, loss mask and inputs across chunk edges (exchanged with the
neighbouring CP ranks); the router's balance-loss statistics and the expert-bias token counts,
reduced over CP ranks; DDP's gradient average over data x context ranks, which the schedule's
factor of N on the loss undoes.

What it gets wrong, fixed here: MTP divides its loss by this rank's tokens (`roll_tensor` returns the
local sum), so under CP its gradient and logged value were means of per-rank means. `install()` has
it divide by the tokens of the whole sequence (summed over CP, divided by N to cancel DDP's average
over the CP ranks, as the main loss is), which makes MTP exact.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

# batch fields split along the sequence (dim 1); anything else (segment ids) stays whole
SPLIT_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


def check_length(seq_len: int, cp_size: int) -> None:
    """ValueError unless 2 x cp_size divides seq_len (Megatron's chunks must be equal)."""
    if cp_size > 1 and seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context={2 * cp_size} "
                         "(each context-parallel rank holds two equal chunks)")


@functools.lru_cache(maxsize=64)
def _positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    check_length(seq_len, cp_size)
    c = seq_len // (2 * cp_size)
    return torch.cat([torch.arange(cp_rank * c, (cp_rank + 1) * c),
                      torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c)])


def positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Sequence positions of CP rank `cp_rank`'s tokens, in the order it holds them: chunk r, then
    chunk 2N-1-r."""
    out = _positions(seq_len, cp_size, cp_rank)
    return out if device is None else out.to(device)


def split_batch(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This CP rank's part of a micro-batch: SPLIT_FIELDS cut along the sequence; segment ids whole."""
    if cp_size == 1:
        return batch
    seq_len = batch["tokens"].shape[1]
    idx = positions(seq_len, cp_size, cp_rank)
    return {k: v.index_select(1, idx.to(v.device)) if k in SPLIT_FIELDS else v for k, v in batch.items()}


@functools.lru_cache(maxsize=64)
def _natural_order(seq_len: int, cp_size: int, device: torch.device) -> torch.Tensor:
    """For each sequence position, its row in the all-gathered tensor (rank j's rows are its chunks j
    and 2N-1-j, one after the other); kept on the device, since every layer uses it."""
    return torch.argsort(torch.cat([_positions(seq_len, cp_size, r) for r in range(cp_size)])).to(device)


def gather_keys_values(key: torch.Tensor, value: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Every CP rank's keys and values, [S, b, groups, d] in sequence order, from this rank's
    [2S / 2N, b, groups, d]. One all-gather of keys and values together; its backward reduce-scatters
    their gradients to the ranks that hold them."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    cp_size = group.size()
    d = key.shape[-1]
    both = gather_from_sequence_parallel_region(torch.cat([key, value], dim=-1), True, group)
    both = both.index_select(0, _natural_order(both.shape[0], cp_size, both.device))
    return both[..., :d], both[..., d:]


def visible(q_positions: torch.Tensor, seq_len: int, segments: torch.Tensor | None) -> torch.Tensor:
    """Dense mask of what the local queries may see, True = visible: [b, 1, sq, S] (or [1, 1, sq, S]
    without segment ids): keys at or before the query's position, in the same document."""
    keys = torch.arange(seq_len, device=q_positions.device)
    mask = keys[None, :] <= q_positions[:, None]
    if segments is None:
        return mask[None, None]
    same = segments[:, q_positions, None] == segments[:, None, :]
    return (same & mask)[:, None]


# ---- MTP's token count --------------------------------------------------------------------------

def _cp_exact_roll(roll):
    """Megatron's `roll_tensor` with the count it returns taken over the whole sequence: the sum over
    the CP group, divided by its size (see the module's docstring)."""

    @functools.wraps(roll)
    def rolled(tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
        out, total = roll(tensor, shifts=shifts, dims=dims, cp_group=cp_group, packed_seq_params=packed_seq_params)
        if cp_group is not None and cp_group.size() > 1:
            total = total.detach().clone()
            dist.all_reduce(total, group=cp_group)
            total = total / cp_group.size()
        return out, total

    rolled.cp_exact = True
    return rolled


def install() -> None:
    """MTP's loss divided by the whole sequence's tokens under CP (GPTModel's use of `roll_tensor`;
    the MTP layer's own rolls of its inputs return the same tensors as before). Idempotent; nothing
    changes without CP."""
    from megatron.core.models.gpt import gpt_model

    if not getattr(gpt_model.roll_tensor, "cp_exact", False):
        gpt_model.roll_tensor = _cp_exact_roll(gpt_model.roll_tensor)
