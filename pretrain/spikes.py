"""Loss spikes: detect them, leave them out, and remember which batches were left out.

A step's loss (the mean over data-parallel ranks, the same number on every rank) is a spike when it
exceeds `faults.spike.factor` x the median of the last `window` steps that were not spikes; there
is no verdict until `window` steps were seen since the start of the run or the last stage switch
(a new stage's data has another loss level). Policies (`faults.spike.policy`):

- `skip`: the step changes nothing. The loop does not call the optimizer (parameters and optimizer
  state stay), puts back the expert biases (which Megatron moves inside `finalize_model_grads`,
  before the loss is known), and records the step.
- `rewind` (PaLM's recipe): go back to the newest checkpoint and leave out every batch from there
  to the spike; a run without a checkpoint yet skips the step instead.
- `off`: no detection.

The recorded steps live in `run.dir/skipped_batches.json`: a run resumed or requeued from an earlier
checkpoint draws those batches from its loader and drops them (the step, tokens and the data
position move on as they did), so it trains exactly what the interrupted run trained.
`max_spikes` spikes within `max_spikes_steps` steps stop the run (exit 3): something is wrong
beyond one batch.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import deque
from pathlib import Path

RECORD = "skipped_batches.json"


class SpikeDetector:
    def __init__(self, cfg, run_dir: Path, writer: bool):
        self.cfg, self.writer = cfg, writer
        self.path = Path(run_dir) / RECORD
        self.recent: deque[float] = deque(maxlen=cfg.window)
        self.record: dict = {"skip": [], "spikes": []}
        if self.path.is_file():
            try:
                self.record = json.loads(self.path.read_text())
            except ValueError as e:
                raise ValueError(f"{self.path}: not readable as JSON ({e}); fix or remove it") from None
        self.skip_steps = set(self.record.get("skip", []))
        self.spikes = [r["step"] for r in self.record.get("spikes", [])]

    @property
    def enabled(self) -> bool:
        return self.cfg.policy != "off"

    def reset(self) -> None:
        """A new stage: its loss level is not the last stage's."""
        self.recent.clear()

    def is_spike(self, loss: float) -> tuple[bool, float]:
        """(whether `loss` is a spike, the median it was compared with); a loss that is not one joins
        the window. Non-finite losses are the optimizer's (its gradient norm is not finite)."""
        if not self.enabled or not math.isfinite(loss):
            return False, float("nan")
        if len(self.recent) < self.cfg.window:
            self.recent.append(loss)
            return False, float("nan")
        median = statistics.median(self.recent)
        if loss > self.cfg.factor * median:
            return True, median
        self.recent.append(loss)
        return False, median

    def add(self, step: int, steps: list[int], loss: float, median: float, policy: str) -> None:
        """Record a spike at `step` and the steps whose batches are left out for it; FloatingPointError
        when there were max_spikes within max_spikes_steps."""
        self.spikes.append(step)
        self.skip_steps.update(steps)
        self.record["skip"] = sorted(self.skip_steps)
        self.record["spikes"].append({"step": step, "loss": loss, "median": median, "policy": policy,
                                      "skipped": steps})
        if self.writer:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.record, indent=1) + "\n")
            os.replace(tmp, self.path)
        recent = [s for s in self.spikes if s > step - self.cfg.max_spikes_steps]
        if len(recent) >= self.cfg.max_spikes:
            raise FloatingPointError(
                f"{len(recent)} loss spikes within {self.cfg.max_spikes_steps} steps (steps {', '.join(map(str, recent))}; "
                f"faults.spike.max_spikes={self.cfg.max_spikes}): stopping rather than training on; the batches "
                f"left out so far are listed in {self.path}")

    def state_dict(self) -> dict:
        """The window of recent losses (the spikes themselves are in the record file: a rewind or a
        resume from before one does not forget it)."""
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict | None) -> None:
        self.recent = deque((state or {}).get("recent", []), maxlen=self.cfg.window)
