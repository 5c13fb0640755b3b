"""The training loop's checkpoints: which one a run starts from, saving a step, and what a save that
fails does. How a checkpoint is laid out, written atomically and read back is CheckpointManager's
(pretrain/checkpoint.py); what goes into one comes from the trainer, as torchtitan's checkpointer
takes its stateful components: its model chunks and optimizer, `state_dict()` (the counters every
rank shares), `rank_state_dict()` (this rank's loader position and RNG), `checkpoint_meta()` and
`hf_files()`; loading gives them back through `load_state_dict` or, for a weights-only checkpoint,
`start_from_weights`.

- `resume`: the checkpoint `latest` names, or, when it cannot be read (a truncated or missing shard,
  a torn save, a bit flip: any error but a checkpoint of another model), the newest older one that
  loads on every rank, loudly (log, TensorBoard text); the unreadable ones are set aside and
  `latest` names the one loaded. None readable: CheckpointError listing each one tried (exit 2).
- `save`, `finish`: a save on every rank together, in the background where train.async_save asks
  for it; `finish` completes a background save whose writers are done (or waits for them). A save
  that fails on any rank fails on every rank: a periodic one lets the run go on under
  faults.on_save_error=continue (the next interval saves again); any other stops the run
  (CheckpointSaveError, exit 4). Each failure is counted in TensorBoard
  (`checkpoint-save-failures`) at the step where it became known.
- `final`: before a launch ends (done, stopped, or at a stage with another layout): this step saved
  unless it is already, and nothing left in flight.
"""

from __future__ import annotations

import logging
import time
import weakref
from pathlib import Path

import torch

from pretrain import watchdog
from pretrain.checkpoint import CheckpointManager, any_rank, describe_error, read_meta

log = logging.getLogger("pretrain")


def async_save(setting: str) -> bool:
    """train.async_save: auto (on a GPU), true or false."""
    return torch.cuda.is_available() if setting == "auto" else setting == "true"


class Checkpointer:
    def __init__(self, run_dir: Path, cfg, trainer):
        # not a reference that keeps the trainer (its model, its loader's worker processes) alive
        self.trainer = weakref.proxy(trainer)
        self.storage = CheckpointManager(run_dir, cfg.train.keep_last, asynchronous=async_save(cfg.train.async_save))
        self.on_save_error, self.save_every = cfg.faults.on_save_error, cfg.train.save_every
        self.saved_step = -1  # the newest step saved (or being saved) by this process, or resumed from
        self.failures = 0  # saves of this launch that failed

    # ---- loading ---------------------------------------------------------------------------

    def resume(self) -> bool:
        """Load the newest checkpoint that loads on every rank (see the module's docstring); False
        for a run without checkpoints."""
        from torch.distributed.checkpoint.api import CheckpointException

        from model.config import ConfigError
        from pretrain.checkpoint_io import CheckpointError, damaged_files

        tried = []
        for path in self.storage.candidates():
            try:
                self.load(path)
                error = ""
            except ConfigError:
                raise  # another model's checkpoint: not a storage fault, older ones hold it too
            # any reader's error (torch's DCP reports every rank's as a BaseException): an older
            # checkpoint may load
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                damaged = damaged_files(path) if self.trainer.rank == 0 else []
                error = describe_error(e) + (f" (damaged: {', '.join(damaged)})" if damaged else "")
            if not any_rank(bool(error)):
                if tried:
                    what = "; ".join(f"{p.name} ({why})" for p, why in tried)
                    log.error(f"resumed from {path.name} instead of the newer {what}; set aside as "
                              f"{self.storage.dir}/.unreadable-<name>, `latest` now names {path.name}")
                    self.trainer.metrics.text("checkpoint", f"resumed from {path.name}: could not load {what}",
                                              self.trainer.step)
                    self.storage.set_aside([p for p, _ in tried], path)
                return True
            why = error or "failed on another rank"
            log.error(f"cannot resume from {path}: {why}")
            tried.append((path, why))
        if tried:
            raise CheckpointError(f"{self.storage.dir}: no checkpoint loads: " +
                                  "; ".join(f"{p.name}: {why}" for p, why in tried))
        return False

    def load(self, path: Path) -> None:
        """Load one checkpoint into the trainer (collective): a resume's, or a spike's rewind."""
        t = self.trainer
        meta = read_meta(path)
        if "model" in meta:  # checkpoints from before meta.json carried it: Megatron checks the shapes
            from model.config import ConfigError, ModelConfig

            differ = t.cfg.model.architecture_differences(ModelConfig(**meta["model"]))
            if differ:
                raise ConfigError(f"{path} holds another model than model={t.cfg.model.name} "
                                  f"(config vs checkpoint): {'; '.join(differ)}")
        common, ranks = self.storage.load(path, t.chunks, t.optimizer)
        if common is None:  # weights only (glm-convert import): a fresh optimizer from the loaded weights
            t.optimizer.reset()
            t.start_from_weights(path, meta)
            return
        t.load_state_dict(common, ranks)
        self.saved_step = t.step
        log.info(f"resumed from {path} at step {t.step}, {t.tokens:,} tokens, stage {t.stage_name}")

    # ---- saving ----------------------------------------------------------------------------

    def save(self, required: bool = True) -> Path | None:
        """Save the trainer's current step (collective); None when the save failed and the run goes on
        (a periodic save under faults.on_save_error=continue)."""
        from pretrain.checkpoint_io import CheckpointSaveError

        t = self.trainer
        watchdog.enter("checkpoint", t.step)
        self.finish(wait=True)  # one save in flight at most (its failure is its own)
        try:
            path, held = self.storage.save(t.step, t.chunks, t.optimizer, t.state_dict(), t.rank_state_dict(),
                                           t.checkpoint_meta(), hf_files=t.hf_files())
        except CheckpointSaveError as e:
            self._failed(e, required)
            return None
        self.saved_step = t.step
        if self.storage.pending is None:
            log.info(f"saved {path} in {held:.1f} s")
        else:
            log.info(f"saving {path.name} in the background (training held {held:.1f} s)")
        return path

    def finish(self, wait: bool = False, required: bool = False) -> None:
        """Complete a background save whose writers are done (collective while one is in flight);
        with `wait`, block until they are. A failed one: as in `save`."""
        from pretrain.checkpoint_io import CheckpointSaveError

        tick = time.perf_counter()
        if wait and self.storage.pending is not None:
            watchdog.enter("checkpoint", self.trainer.step)
        try:
            path = self.storage.poll(wait)
        except CheckpointSaveError as e:
            self.saved_step = -1  # that step was not saved after all
            self._failed(e, required)
            return
        if path is not None:
            log.info(f"saved {path}" + (f" (waited {time.perf_counter() - tick:.1f} s)" if wait else ""))

    def final(self) -> None:
        """The end of a launch: this step saved unless it is, and every save complete (a failure of
        either stops the run, exit 4)."""
        if self.saved_step != self.trainer.step:
            self.save()
        self.finish(wait=True, required=True)

    def _failed(self, e: Exception, required: bool) -> None:
        # TensorBoard has the count at the step where the failure became known, beside each logged
        # step's: a background save's failure reaches the loop a step or more after the save began,
        # whenever its writers end, and the last one may be known only after the last logged step
        t = self.trainer
        self.failures += 1
        t.metrics.write({"checkpoint-save-failures": self.failures}, t.step, t.tokens)
        t.metrics.text("checkpoint", f"step {t.step}: {e}", t.step)
        if required or self.on_save_error != "continue":
            raise e
        log.error(f"{e}; training goes on (faults.on_save_error=continue), the next save in {self.save_every} steps")
