"""The one way a run saves and loads its state: Megatron dist-checkpointing, atomically.

What a checkpoint holds (`run.dir/checkpoints/step-XXXXXXXX/`):
  - the model, through its `sharded_state_dict` (global layer and expert ids: loads under another
    tensor / expert / data-parallel layout);
  - both optimizer sides (optim/checkpoint.py: whole-model names, each owner writes its part);
  - common state written once: the trainer's counters (step, consumed tokens and samples, stage,
    skipped steps), and each rank's loader state and RNG states, gathered by rank 0;
  - `meta.json`: step, tokens, stage, world size and layout, and the model config as it stands
    at that step (the stage's RoPE base and MTP weight included), for people and tools;
  - `hf/`: tokenizer files to hand on with the weights (`glm-convert export` copies them).

A weights-only checkpoint (`glm-convert import`; `meta.json` says `weights_only`) holds the
model's tensors and nothing else; loading it leaves the optimizer and trainer state fresh.

A save writes into `.tmp-step-XXXXXXXX` and is renamed once every rank has finished; then
`latest` (a one-line file) is replaced atomically. So `latest` only ever names a complete
checkpoint, and a crash in the middle of a save leaves the previous one intact. Only the newest
`keep_last` are kept. Loading reads plain data only (torch.load with weights_only).

Asynchronous saves (`train.async_save`, on by default on GPUs): the step's tensors are copied to
host memory (on a CPU, a forked writer's copy-on-write snapshot is that copy) and a writer process
puts them on disk while training goes on; Megatron's `AsyncCallsQueue` runs it. Every rank asks
after each step whether all writers are done (`poll`, one small all-reduce while a save is in
flight, nothing otherwise); once they are, the rename and `latest` happen as for a synchronous
save. One save is in flight at most: the next one, the end of the run and a signal stop wait for it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

LATEST = "latest"
HF_FILES = "hf"
_TMP = ".tmp-"
_UNREADABLE = ".unreadable-"  # a checkpoint a resume could not load, set aside (CheckpointManager.set_aside)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def meta_to_resume(run_dir: str | Path) -> dict | None:
    """The meta.json of the newest checkpoint in `run_dir` that has a readable one (`latest` first;
    None without a checkpoint). Plain files only: read before any process group starts."""
    for path in CheckpointManager(run_dir).candidates():
        try:
            return read_meta(path)
        except (OSError, ValueError):
            continue  # resume() says why, and falls back past it too
    return None


def stage_of(meta: dict) -> str | None:
    """The stage whose batch a run resumed from a checkpoint with this meta.json trains next (None for
    an import that names no stage)."""
    return meta.get("next_stage") or meta.get("stage") or None


def stage_to_resume(run_dir: str | Path) -> str | None:
    """The stage whose batch a run in `run_dir` trains next (None without a checkpoint): it decides
    the parallel layout."""
    return stage_of(meta_to_resume(run_dir) or {})


def find(path: str | Path) -> Path:
    """A run directory (its latest checkpoint), its checkpoints/ folder, or one checkpoint directory
    -> the checkpoint directory."""
    from pretrain.checkpoint_io import CheckpointError

    path = Path(path)
    run = path if (path / "checkpoints" / LATEST).is_file() else path.parent if (path / LATEST).is_file() else None
    if run is not None:
        try:
            return CheckpointManager(run).latest()
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
    if (path / "metadata.json").is_file():
        if not (path / "meta.json").is_file():
            raise CheckpointError(f"{path}: no meta.json (a save that did not finish, or not written by glm-pretrain "
                                  "or glm-convert)")
        return path
    raise CheckpointError(f"{path}: neither a run directory (checkpoints/{LATEST}) nor a checkpoint directory "
                          "(metadata.json, meta.json)")


def model_config(ckpt: Path):
    """The model config a checkpoint was written for: meta.json's, else (checkpoints written before
    meta.json carried it) the run's config.yaml with the stage's values applied."""
    from omegaconf import OmegaConf

    from model.config import ModelConfig
    from pretrain.checkpoint_io import CheckpointError

    meta = read_meta(ckpt)
    if "model" in meta:
        return ModelConfig(**meta["model"]).validate(str(ckpt / "meta.json"))
    run_config = ckpt.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise CheckpointError(f"{ckpt / 'meta.json'} has no model config and there is no {run_config}")
    run = OmegaConf.to_container(OmegaConf.load(run_config))
    model = dict(run["model"])
    for name, stage in run.get("stages", {}).items():
        model.update({k: stage[k] for k in ("rope_theta", "mtp_loss_weight", "expert_bias_update_rate")
                      if stage.get(k) is not None})
        if name == meta.get("stage"):
            break
    return ModelConfig(**model).validate(str(run_config))


def finish_external(run_dir: Path, ckpt: Path, meta: dict) -> None:
    """Complete a checkpoint written outside the training loop (glm-convert import): its meta.json
    and the run's `latest` pointing at it."""
    (ckpt / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    (run_dir / "checkpoints" / LATEST).write_text(ckpt.name + "\n")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def describe_error(e: BaseException) -> str:
    """One line for an error: its type and message; for torch DCP's CheckpointException, which
    wraps each failing rank's exception, the first of those (and the error that caused it)."""
    inner = getattr(e, "failures", None)
    if isinstance(inner, dict) and inner:
        rank, failure = next(iter(inner.items()))  # (exception, traceback summary)
        e = failure[0] if isinstance(failure, tuple) else failure
        prefix = f"rank {rank}: "
    else:
        prefix = ""
    while e.__cause__ is not None and "Worker failure" in str(e):  # the async writer's wrapper
        e = e.__cause__
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{prefix}{type(e).__name__}" + (f": {text}" if text else "")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return ""


def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["tracker"] = {k: v for k, v in get_cuda_rng_tracker().get_states().items()}
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["tracker"])


def _model_keys(chunks: list) -> list[str]:
    # Megatron-LM's convention: "model", or "model0", "model1", ... for virtual pipeline stages.
    # Tensors are found by their sharded keys (global layer ids), so either loads the other.
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _model_state(chunks: list) -> dict:
    from megatron.core import parallel_state as ps

    # the data-parallel group: for the last pipeline stage's copy of the word embedding (MTP)
    metadata = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    return {key: chunk.sharded_state_dict(metadata=metadata) for key, chunk in zip(_model_keys(chunks), chunks)}


def _signal_proof_results_queue() -> None:
    """Megatron's checkpoint writers report through a queue of a multiprocessing manager it spawns on
    first use; a spawned process starts with the default signal actions, so the preemption signal
    that Slurm sends to every process of a job (USR1, SIGTERM) killed it, and the very save that
    signal asked for failed ("Broken pipe"). The same queue, from a manager that ignores them."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:  # (what ctx.Manager() does, plus the initializer)
        from pretrain.faults import ignore_stop_signals

        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=ignore_stop_signals)
        filesystem_async._results_queue = manager.Queue()  # (its proxy keeps the manager alive)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int = 3, asynchronous: bool = False):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.asynchronous = asynchronous
        self._calls = None  # Megatron's AsyncCallsQueue, made at the first asynchronous save
        self.pending: Path | None = None  # the checkpoint being written in the background

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
        return path

    def candidates(self) -> list[Path]:
        """What a resume tries, in order: the checkpoint `latest` names (even one that turns out
        incomplete), then every other complete checkpoint, newest first. Empty for a new run."""
        pointer = self.dir / LATEST
        named = [self.dir / pointer.read_text().strip()] if pointer.is_file() else []
        older = sorted((p for p in self.dir.glob("step-*") if (p / "meta.json").is_file()), reverse=True)
        return list(dict.fromkeys([*named, *older]))

    def set_aside(self, bad: list[Path], good: Path) -> None:
        """After a resume fell back past unreadable checkpoints: rename each `.unreadable-<name>` (kept
        for inspection; neither resumed from nor pruned again) and point `latest` at the one that
        loaded. Rank 0 does it; collective."""
        if _rank() == 0:
            for path in bad:
                if path.exists():
                    os.replace(path, path.parent / f"{_UNREADABLE}{path.name}")
            pointer = self.dir / f"{LATEST}.tmp"
            pointer.write_text(good.name + "\n")
            os.replace(pointer, self.dir / LATEST)
        _barrier()

    def save(self, step: int, chunks: list, optimizer, common: dict, per_rank: dict, meta: dict,
             hf_files: tuple[Path, ...] = ()) -> tuple[Path, float]:
        """Save on every rank (collective). `common`: plain data, the same on every rank;
        `per_rank`: this rank's plain data (loader state, RNG), gathered to rank 0; `hf_files`:
        files to hand on with the weights (the tokenizer), copied into `hf/` by rank 0.
        Returns the checkpoint's path (complete, or `pending` when asynchronous) and the seconds
        the caller was held, the wait for an earlier save in flight included."""
        from megatron.core import dist_checkpointing

        from optim import checkpoint as optim_checkpoint

        from torch.distributed.checkpoint.api import CheckpointException

        from pretrain import faults

        started = time.perf_counter()
        self.wait()
        name = step_name(step)
        tmp, final = self.dir / f"{_TMP}{name}", self.dir / name
        ranks = _gather(per_rank)
        error = ""
        if _rank() == 0:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                error = describe_error(e)
        self._agree(error, tmp, final)
        state = {**_model_state(chunks), **optim_checkpoint.sharded_state_dict(optimizer),
                 "trainer": common, "ranks": ranks}
        _signal_proof_results_queue()
        commit = partial(self._commit, tmp, final, meta, tuple(hf_files))
        try:
            # a write that fails on any rank raises CheckpointException on every rank (DCP gathers
            # the writers' results); the test-only switch makes this rank's writes fail
            with faults.failing_writes(step):
                if not self.asynchronous:
                    dist_checkpointing.save(state, str(tmp))
                else:
                    # the tensors are staged (copied off the GPU) before this returns; the files come later
                    request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
                    request.add_finalize_fn(commit)
                    self._queue().schedule_async_request(request)
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            self._failed(describe_error(e), tmp, final)
        if not self.asynchronous:
            commit()
            return final, time.perf_counter() - started
        self.pending = final
        return final, time.perf_counter() - started

    def _agree(self, error: str, tmp: Path, final: Path) -> None:
        """Collective: every rank raises CheckpointSaveError if `error` is set on any."""
        if any_rank(bool(error)):
            self._failed(error, tmp, final, gather=True)

    def _failed(self, error: str, tmp: Path, final: Path, gather: bool = False) -> None:
        """The save of `final` failed (on every rank's knowledge): the partial directory is removed
        (marked `.tmp-`, never taken for a checkpoint, should that fail too), `latest` untouched;
        CheckpointSaveError on every rank, naming the path, the error and the rank(s)."""
        from pretrain.checkpoint_io import CheckpointSaveError

        if gather:  # only the failing ranks know their errors
            errors = [e for e in _gather(error) if e]
            error = "; ".join(dict.fromkeys(f"{e}" for e in errors))
        self.pending = None
        try:  # a full disk shows as torch's "unexpected pos" from its zip writer as often as ENOSPC
            usage = shutil.disk_usage(self.dir)
            space = f"; {_size(usage.free)} free of {_size(usage.total)} on its file system (partial save included)"
        except OSError:
            space = ""
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = (self.dir / LATEST).read_text().strip() if (self.dir / LATEST).is_file() else None
        from pretrain.watchdog import lost_a_peer

        if lost_a_peer(RuntimeError(error)):  # a rank (its node) went away mid-save: not the disk's fault, and
            # a restart goes on (exit 1, requeued; the watchdog's verdict names the lost rank)
            raise RuntimeError(f"cannot save {final}: a peer was lost during the save ({error}); `latest` still "
                               f"names {previous or 'no checkpoint'}")
        raise CheckpointSaveError(f"cannot save {final}: {error}{space}; " +
                                  (f"`latest` still names {previous}" if previous else "no checkpoint was saved before")
                                  + f" and the partial {tmp.name} was removed")

    def _queue(self):
        if self._calls is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._calls = AsyncCallsQueue()
        return self._calls

    def poll(self, wait: bool = False) -> Path | None:
        """Complete the save in flight if every rank's writer has finished (or, with `wait`, once
        they have); returns the checkpoint completed by this call, if any. Collective while a save
        is in flight; does nothing otherwise."""
        from torch.distributed.checkpoint.api import CheckpointException

        from pretrain.checkpoint_io import CheckpointSaveError

        if self.pending is None:
            return None
        try:
            done = self._queue().maybe_finalize_async_calls(blocking=wait)
        except CheckpointException as e:  # a writer failed: every rank raises it
            final = self.pending
            self._failed(describe_error(e), final.parent / f"{_TMP}{final.name}", final)
        except CheckpointSaveError:  # in the commit
            self.pending = None
            raise
        if not done:
            return None
        path, self.pending = self.pending, None
        return path

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is complete; returns it."""
        return self.poll(wait=True)

    def _commit(self, tmp: Path, final: Path, meta: dict, hf_files: tuple[Path, ...]) -> None:
        """Every rank's files are written: meta.json, the files to hand on, the rename and `latest`
        (collective; a failure on rank 0, such as a full disk, is every rank's CheckpointSaveError)."""
        _barrier()
        error = ""
        if _rank() == 0:
            try:
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
                for f in hf_files:
                    (tmp / HF_FILES).mkdir(exist_ok=True)
                    shutil.copyfile(f, tmp / HF_FILES / Path(f).name)
                if final.exists():  # the same step saved again (a resumed run that stopped at once)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                pointer = self.dir / f"{LATEST}.tmp"
                pointer.write_text(final.name + "\n")
                os.replace(pointer, self.dir / LATEST)
            except OSError as e:
                error = describe_error(e)
                if final.exists() and not (tmp.exists()):  # renamed, `latest` not moved: back to a partial
                    os.replace(final, tmp)
            else:
                self._prune(keep=final.name)
        self._agree(error, tmp, final)

    def _prune(self, keep: str) -> None:
        for stale in self.dir.glob(f"{_TMP}*"):  # left by a save that died
            shutil.rmtree(stale, ignore_errors=True)
        if not self.keep_last:
            return
        done = sorted(p for p in self.dir.glob("step-*") if (p / "meta.json").is_file())
        for old in done[:-self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, chunks: list, optimizer) -> tuple[dict, dict]:
        """Load model and optimizer in place; return (trainer's common state, this rank's own
        per-rank state, or every rank's under `all` when the world size changed)."""
        from megatron.core import dist_checkpointing

        from optim import checkpoint as optim_checkpoint

        if read_meta(path).get("weights_only"):
            self._load_weights(path, chunks)
            return None, None
        state = {**_model_state(chunks), **optim_checkpoint.sharded_state_dict(optimizer)}
        loaded = dist_checkpointing.load(state, str(path))
        for key, chunk in zip(_model_keys(chunks), chunks):
            chunk.load_state_dict(loaded[key])
        optim_checkpoint.load_sharded_state_dict(optimizer, loaded)
        ranks = loaded["ranks"]
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = ranks[_rank()] if len(ranks) == world else None
        return loaded["trainer"], {"mine": mine, "all": ranks}

    @staticmethod
    def _load_weights(path: Path, chunks: list) -> None:
        """The model's tensors only. Megatron's per-module extra state (Transformer Engine's FP8
        metadata; empty for the other layer implementations) is not in such a checkpoint: the
        modules keep their fresh one."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        def tensors_only(d):
            return {k: tensors_only(v) if isinstance(v, dict) else v for k, v in d.items()
                    if not isinstance(v, ShardedObject)}

        loaded = dist_checkpointing.load(tensors_only(_model_state(chunks)), str(path))
        for key, chunk in zip(_model_keys(chunks), chunks):
            result = chunk.load_state_dict(loaded[key], strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
            if missing or result.unexpected_keys:
                raise KeyError(f"{path}: weights do not fit the model: missing {missing[:3]}, "
                               f"unexpected {result.unexpected_keys[:3]}")
