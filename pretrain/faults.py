"""Stopping early, on purpose or not: signals, a time limit, the exit codes a launcher relies on,
and the test-only fault switch.

SIGTERM (what Slurm sends at a time limit or on preemption, and what `scancel` sends) and SIGUSR1
(`sbatch --signal=USR1@120`) only set a flag. The loop asks `should_stop()` once per step, which
all ranks answer together (a max-reduction), so every rank saves the same step and exits.

Hangs and dead ranks are the watchdog's (pretrain/watchdog.py), loss spikes the loop's
(pretrain/spikes.py), failed saves the checkpoint manager's (pretrain/checkpoint.py); each ends with
one of the codes below, which slurm/common.sh maps to finish / requeue / give up.
"""

from __future__ import annotations

import os
import signal
import time

EXIT_DONE = 0  # the run reached its end
EXIT_FAILED = 1  # an error (a Python exception)
EXIT_CONFIG = 2  # a bad config or data, or no checkpoint in run.dir that loads: a person must look
EXIT_UNSTABLE = 3  # too many loss spikes (faults.spike.max_spikes) or non-finite steps in a row
# (optim.max_skipped_steps): restarting would meet them again
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written (ENOSPC, EIO, ...) and faults.on_save_error=stop;
# `latest` still names the previous one
EXIT_RESUME = 75  # stopped early with a checkpoint saved: start it again to resume (EX_TEMPFAIL); also
# at a stage with another parallel layout, which the restart takes (pretrain/train.py)
EXIT_HUNG = 76  # the watchdog ended the run: a rank stopped making progress, or one died while the
# others waited (pretrain/watchdog.py); start it again to resume from `latest`

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early = ""  # a stop signal that came before the loop (start-up) or after it (shutting down)
_stop_signalled = False  # any stop signal this process received, for the test-only `pause` fault


def _remember(signum, frame):
    global _early, _stop_signalled
    _early = _early or signal.Signals(signum).name
    _stop_signalled = True


def ignore_stop_signals() -> None:
    """In a helper process the training process starts (a checkpoint writer's results manager): a
    scheduler signals every process of the job (Slurm's `--signal=USR1`, SIGTERM at a time limit), and
    the training process, which decides when to stop, still needs its helpers for the save it makes."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def catch_stop_signals() -> None:
    """For the whole life of a training process: a stop signal outside the loop is remembered, not
    fatal. One during start-up stops the run at its first step (saved, exit 75), as during training;
    one while it shuts down (a launcher ending every rank once one has exited) lets it finish its
    exit path and its last message instead of dying in the middle."""
    for sig in SIGNALS:
        signal.signal(sig, _remember)


class StopFlag:
    def __init__(self, exit_after_minutes: float = 0.0):
        self.reason = _early
        self.deadline = time.monotonic() + exit_after_minutes * 60 if exit_after_minutes else None
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        global _stop_signalled
        self.reason = self.reason or signal.Signals(signum).name
        _stop_signalled = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank was signalled or is past the time limit."""
        import torch
        import torch.distributed as dist

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


# ---- test-only fault injection -----------------------------------------------------------------
# GLM_TEST_FAULTS="kind@rank=R,step=S[,until=S2][,restart=N][,seconds=X][,factor=F]; ..." makes the
# run misbehave at a given point, for the tests of the code above and of the watchdog. Unset (every
# real run), `inject` and `loss_factor` return at once. Kinds:
#   stop        the rank stops itself (SIGSTOP) at the start of step S
#   hold_gil    the rank blocks in C while holding the GIL (ctypes.PyDLL's sleep) at step S
#   kill        the rank kills itself (SIGKILL) where it would join the gradient all-reduce of step S
#   slow        the rank sleeps `seconds` in its own work of steps S..until
#   spike       the loss of step S is multiplied by `factor` (every rank)
#   pause       the rank waits at the start of step S until it receives a stop signal (at most `seconds`,
#               600 by default), saying so in the log: a test that signals once it reads that line
#               knows the run stops after step S, however fast the steps go
#   enospc      the rank's checkpoint write of step S fails with ENOSPC
#   stall       the rank's checkpoint write of step S puts its first tensor data on disk, then
#               waits for good (a save caught in the middle: the test kills the run there)
# `restart=N` limits a fault to the launch with that restart count (SLURM_RESTART_COUNT or
# TORCHELASTIC_RESTART_COUNT; 0 is the first launch).
TEST_FAULTS_ENV = "GLM_TEST_FAULTS"


def _parse(spec: str) -> list[dict]:
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, args = part.partition("@")
        fault = {"kind": kind.strip()}
        for kv in filter(None, args.split(",")):
            k, _, v = kv.partition("=")
            fault[k.strip()] = float(v) if k.strip() in ("seconds", "factor") else int(v)
        out.append(fault)
    return out


_FAULTS = _parse(os.environ.get(TEST_FAULTS_ENV, ""))
_restart = int(os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
step_now = 0  # the step being trained, for loss_factor (set by the loop when faults are injected)


def _active(point_kinds: tuple, step: int, rank: int):
    for f in _FAULTS:
        if f["kind"] not in point_kinds or f.get("restart", _restart) != _restart:
            continue
        if "rank" in f and f["rank"] != rank:
            continue
        if f.get("step", step) <= step <= f.get("until", f.get("step", step)):
            yield f


def inject(point: str, step: int) -> None:
    """The test-only faults of `point` ('step': the start of a step; 'work': before the gradient
    all-reduce) at `step` on this rank."""
    if not _FAULTS:
        return
    import torch.distributed as dist

    global step_now
    step_now = step
    rank = dist.get_rank() if dist.is_initialized() else 0
    kinds = {"step": ("stop", "hold_gil", "pause"), "work": ("kill", "slow")}[point]
    for f in _active(kinds, step, rank):
        kind = f["kind"]
        if kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif kind == "hold_gil":
            import ctypes

            sleep = ctypes.PyDLL(None).sleep  # PyDLL: the GIL stays held during the call
            while True:  # a signal ends sleep() early: block again
                sleep(3600)
        elif kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "slow":
            time.sleep(f["seconds"])
        elif kind == "pause":
            import logging

            logging.getLogger("pretrain").warning(f"{TEST_FAULTS_ENV}: rank {rank} waits at the start of step "
                                                  f"{step} for a stop signal")
            deadline = time.monotonic() + f.get("seconds", 600.0)
            while not _stop_signalled and time.monotonic() < deadline:
                time.sleep(0.01)


def loss_factor() -> float:
    """The test-only loss multiplier of the current step (1.0 without a `spike` fault)."""
    if not _FAULTS:
        return 1.0
    factor = 1.0
    for f in _active(("spike",), step_now, -1):
        factor *= f.get("factor", 100.0)
    return factor


class failing_writes:
    """Test-only: within it, this rank's checkpoint tensor writes fail with ENOSPC if an `enospc`
    fault names this step, or stall after the first one if a `stall` fault does (in the writer
    process too: it is forked inside). Does nothing otherwise."""

    def __init__(self, step: int):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        found = [f["kind"] for f in _active(("enospc", "stall"), step, rank)] if _FAULTS else []
        self.kind = found[0] if found else None
        self.saved = []

    def __enter__(self):
        if self.kind is not None:
            import errno
            import functools

            from megatron.core.dist_checkpointing.strategies import filesystem_async
            from torch.distributed.checkpoint import filesystem

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device (injected by GLM_TEST_FAULTS)")

            for module in (filesystem_async, filesystem):
                original = module._write_item

                @functools.wraps(original)  # its signature: Megatron's writer inspects it
                def stalled(*args, original=original, **kwargs):
                    original(*args, **kwargs)
                    for stream in (a for a in args if hasattr(a, "flush")):
                        stream.flush()  # the tensor data is in the file
                    while True:  # until the test kills the run
                        time.sleep(1)

                self.saved.append((module, original))
                module._write_item = full if self.kind == "enospc" else stalled
        return self

    def __exit__(self, *exc):
        for module, original in self.saved:
            module._write_item = original
        return False
