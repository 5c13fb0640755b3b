"""Stragglers: a rank that is slower than its peers at every step makes every rank wait for it.

Each logged step, every rank's own work (from the step's start until it joins the gradient
all-reduce: pretrain/train.py's ExpertLoad times it; a rank that waits for a slow peer inside the
pipeline or tensor/expert-parallel collectives before that counts as slow too) is set against the
median of the ranks of its pipeline stage, which do the same work. TensorBoard gets the slowest rank
and its ratio; the console names a rank that stays the slowest by more than `faults.straggler.factor`
for `faults.straggler.steps` logged steps in a row.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger("pretrain")


class Stragglers:
    """The slowest rank of each logged step, and how long it has been the slowest."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.slowest, self.in_a_row = -1, 0

    def scalars(self, work_s: float, step: int) -> dict:
        from megatron.core import parallel_state as ps

        world = dist.get_world_size()
        if world == 1:
            return {}
        mine = torch.tensor([work_s, float(ps.get_pipeline_model_parallel_rank())], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(world)]
        if dist.get_backend() == "nccl":
            mine, every = mine.cuda(), [e.cuda() for e in every]
        dist.all_gather(every, mine)
        work = torch.stack(every).cpu()
        ratios = torch.empty(world, dtype=torch.float64)
        for stage in work[:, 1].unique():
            peers = work[:, 1] == stage
            ratios[peers] = work[peers, 0] / work[peers, 0].median().clamp(min=1e-9)
        slowest = int(ratios.argmax())
        ratio = float(ratios[slowest])
        if ratio > self.cfg.factor:
            self.in_a_row = self.in_a_row + 1 if slowest == self.slowest else 1
            self.slowest = slowest
            if self.in_a_row == self.cfg.steps or (self.in_a_row > self.cfg.steps and self.in_a_row % 100 == 0):
                log.warning(f"straggler: rank {slowest} has been the slowest for {self.in_a_row} logged steps: its own "
                            f"work took {work[slowest, 0]:.3f} s at step {step}, {ratio:.1f}x the median of its pipeline "
                            f"stage's ranks (faults.straggler.factor={self.cfg.factor}); every rank waits for it")
        else:
            self.slowest, self.in_a_row = -1, 0
        return {"straggler/slowest-rank": slowest, "straggler/slowest-over-median": ratio}
