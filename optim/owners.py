"""Spread optimizer work over data-parallel ranks (ZeRO-1 by whole parameter), then share results.

Each parameter's state and update live on exactly one rank of its data-parallel group (the
expert-data-parallel group for routed experts). Parameters are dealt by cost, largest first, to
the least-loaded rank (LPT), so Newton-Schulz work is done once per group and evenly; the deal
depends only on names, shapes and order, so every rank computes the same one without talking.
"""

from __future__ import annotations

import heapq

import torch
import torch.distributed as dist


def deal(costs: list[int], ranks: int) -> list[int]:
    """Owner rank of each item: longest-processing-time-first onto the least-loaded rank."""
    owners = [0] * len(costs)
    heap = [(0, r) for r in range(ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


def loads(costs: list[int], owners: list[int], ranks: int) -> list[int]:
    out = [0] * ranks
    for c, o in zip(costs, owners):
        out[o] += c
    return out


@torch.no_grad()
def share(params_by_rank: list[list[torch.Tensor]], group) -> None:
    """Every rank's updated parameters to every rank of `group`, in one all-gather.

    params_by_rank[r]: the parameters rank r owns, in the same order on every rank.
    """
    size = len(params_by_rank)
    if size == 1:
        return
    me = dist.get_rank(group)
    counts = [sum(p.numel() for p in ps) for ps in params_by_rank]
    longest = max(counts)
    if longest == 0:
        return
    dtype = next(p for ps in params_by_rank for p in ps).dtype
    device = next(p for ps in params_by_rank for p in ps).device
    mine = torch.zeros(longest, dtype=dtype, device=device)
    if params_by_rank[me]:
        torch.cat([p.reshape(-1) for p in params_by_rank[me]], out=mine[:counts[me]])
    gathered = torch.empty(size * longest, dtype=dtype, device=device)
    dist.all_gather_into_tensor(gathered, mine, group=group)
    for r, ps in enumerate(params_by_rank):
        if r == me:
            continue
        offset = r * longest
        for p in ps:
            p.copy_(gathered[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
