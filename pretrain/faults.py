"""Stopping early on purpose: signals, a time limit, and the exit codes a launcher relies on.

SIGTERM (what Slurm sends at a time limit or on preemption, and what `scancel` sends) and SIGUSR1
(`sbatch --signal=USR1@120`) only set a flag. The loop asks `should_stop()` once per step, which
all ranks answer together (a max-reduction), so every rank saves the same step and exits.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

EXIT_DONE = 0  # the run reached its end
EXIT_FAILED = 1  # an error (a Python exception)
EXIT_RESUME = 75  # stopped early with a checkpoint saved: start it again to resume (EX_TEMPFAIL); also
# at a stage with another parallel layout, which the restart takes (pretrain/train.py)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self, exit_after_minutes: float = 0.0):
        self.reason = ""
        self.deadline = time.monotonic() + exit_after_minutes * 60 if exit_after_minutes else None
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.reason = self.reason or signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank was signalled or is past the time limit."""
        if not self.reason and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "run.exit_after_minutes"
        flag = torch.tensor([1.0 if self.reason else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.reason:
            self.reason = "another rank's signal"
        return bool(flag.item())
