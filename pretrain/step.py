"""One micro-batch through the model: inputs, attention mask, loss. The forward-step function
handed to Megatron-Core's `get_forward_backward_func()` schedules."""

from __future__ import annotations

import torch


def attention_mask(batch: dict) -> torch.Tensor | None:
    """None (causal, Megatron's default) for concatenated sequences; for best-fit packing the rows'
    segment ids [b, s], which every core attention turns into its own document mask
    (model/attention.py)."""
    return batch.get("segment_ids")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_step(data_iterator, model):
    """Megatron's forward-step contract: (per-token losses, loss function of them).

    Under context parallelism (model/context_parallel.py) every rank of the CP group reads the same
    micro-batch and keeps its two chunks of each sequence; the loss is this rank's sum over the
    count of the whole sequence's tokens (summed over the CP group), which the schedule's factor of
    N and DDP's average over data x context ranks turn into the mean over all of them."""
    from megatron.core import parallel_state as ps

    from model import context_parallel
    from pretrain import faults

    device = next(model.parameters()).device
    cp = ps.get_context_parallel_world_size()
    batch = to_device(context_parallel.split_batch(next(data_iterator), cp, ps.get_context_parallel_rank()),
                      device)
    mask = batch["loss_mask"]
    losses = model(batch["tokens"], batch["position_ids"], attention_mask(batch), labels=batch["labels"],
                   loss_mask=mask)

    def loss_func(output: torch.Tensor):
        # mean over this micro-batch's tokens that carry a loss; the schedule divides by the number
        # of micro-batches and DDP averages over data-parallel ranks
        total = (output.float() * mask).sum()
        factor = faults.loss_factor()  # 1.0: only a test injects a spike
        if factor != 1.0:
            total = total * factor
        if cp == 1:
            loss = total / mask.sum().clamp(min=1)
            # a copy: the schedule divides the returned loss in place by the number of micro-batches
            return loss, {"lm loss": loss.detach().clone()}
        # one all-reduce over the CP group: the sequence's loss sum (to report) and token count
        whole = torch.stack([total.detach(), mask.sum().float()])
        torch.distributed.all_reduce(whole, group=ps.get_context_parallel_group())
        count = whole[1].clamp(min=1)
        return total / count, {"lm loss": whole[0] / count}

    return losses, loss_func


class _Tee:
    """Model chunk `k`'s view of a shared stream of micro-batches (see `per_chunk`)."""

    def __init__(self, source, buffer: dict, positions: list, k: int):
        self.source, self.buffer, self.positions, self.k = source, buffer, positions, k

    def __iter__(self):
        return self

    def __next__(self):
        i = self.positions[self.k]
        if i not in self.buffer:
            self.buffer[i] = next(self.source)
        self.positions[self.k] = i + 1
        batch = self.buffer[i]
        if all(p > i for p in self.positions):  # every chunk has read it
            del self.buffer[i]
        return batch


def per_chunk(iterator, chunks: int):
    """The data iterator for Megatron's schedules: the iterator itself for one model chunk; for
    virtual pipeline stages one iterator per chunk, each giving the same micro-batches in order
    (every chunk's forward step reads micro-batch i: the first for tokens, the last for labels
    and MTP, all of them for masks), read once from the loader and held until all have read it."""
    if chunks == 1:
        return iterator
    buffer, positions = {}, [0] * chunks
    return [_Tee(iterator, buffer, positions, k) for k in range(chunks)]
