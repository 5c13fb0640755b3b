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


# Elements each rank sends per round of `share` at most: the memory it needs is bounded by this,
# not by the largest owner's parameters (a rank that owns the word embedding owns ~0.6B).
ROUND_ELEMENTS = 1 << 26


def share_bytes(counts: list[float], element_bytes: int) -> float:
    """Memory `share` allocates: one round's send buffer and the gathered buffer of one per rank
    (nothing for a group of one)."""
    if len(counts) < 2:
        return 0.0
    return (len(counts) + 1) * min(max(counts), ROUND_ELEMENTS) * element_bytes


def _copy_range(params: list[torch.Tensor], start: int, n: int, buffer: torch.Tensor, into_buffer: bool) -> None:
    """Elements [start, start + n) of `params` laid end to end, to or from `buffer[:n]`."""
    offset = 0
    for p in params:
        lo, hi = max(start, offset), min(start + n, offset + p.numel())
        if lo < hi:
            flat, part = p.view(-1)[lo - offset:hi - offset], buffer[lo - start:hi - start]
            (part.copy_(flat) if into_buffer else flat.copy_(part))
        offset += p.numel()
        if offset >= start + n:
            return


@torch.no_grad()
def share(params_by_rank: list[list[torch.Tensor]], group) -> None:
    """Every rank's updated parameters to every rank of `group`: all-gathers of at most
    ROUND_ELEMENTS per rank, each rank's parameters laid end to end.

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
    first = next(p for ps in params_by_rank for p in ps)
    chunk = min(longest, ROUND_ELEMENTS)
    send = torch.zeros(chunk, dtype=first.dtype, device=first.device)
    gathered = torch.empty(size * chunk, dtype=first.dtype, device=first.device)
    for start in range(0, longest, chunk):
        n = min(chunk, longest - start)
        _copy_range(params_by_rank[me], start, n, send, into_buffer=True)
        dist.all_gather_into_tensor(gathered[:size * n], send[:n], group=group)
        for r, ps in enumerate(params_by_rank):
            if r != me:
                _copy_range(ps, start, n, gathered[r * n:(r + 1) * n], into_buffer=False)
