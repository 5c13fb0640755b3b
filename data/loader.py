"""The training data loader: a weighted mixture of prepared datasets, packed into sequences of the
stage's length, split across data-parallel ranks and dataloader workers, exactly resumable.

Each (rank, worker) pair is one reader slot with its own disjoint shards of every source. A slot's
mixture picks, for every sequence, the source furthest behind its weight (smooth weighted
round-robin: proportions are exact to within one sequence, with no randomness to save).

State (`state_dict`) is a few integers per slot and source. Resuming:
- same data-parallel size, workers, seed and shuffle window: exact - the stream continues with the
  next sequence, nothing repeated or skipped;
- same layout but another sequence length or packing (a new stage): each source continues from the
  next stored sample it had not started; new sources start fresh;
- another data-parallel size or worker count (or seed, or shuffle window): every shard that any old
  reader had started in its epoch counts as read, the unread shards of those epochs are dealt to the
  new readers, and later epochs follow as usual. Nothing is repeated; skipped at most is the unread
  rest of one started shard per old reader and source. This needs the states of all old ranks.
"""

from __future__ import annotations

import copy
import itertools
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import format as fmt
from data.config import DataConfig
from data.packing import BestFitPacker, ConcatPacker
from data.objstore import Counters
from data.stream import Dataset, ErrorPolicy, SlotStream, held_out, open_dataset, sum_counts

STATE_VERSION = 2


def open_sources(cfg: DataConfig, model_vocab: int | None = None, part: str = "train") -> list[Dataset]:
    """Open every source's manifest and check they share one tokenizer that fits the model; keep the
    training or the validation part of each (`cfg.holdout_shards`)."""
    datasets = [held_out(open_dataset(s.name, s.path, s.urls, cfg.retries()), cfg.holdout_shards, part)
                for s in cfg.sources]
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.tokenizer_sha != first.tokenizer_sha:
            raise fmt.DataError(f"sources '{first.name}' and '{ds.name}' were tokenised with different tokenizers "
                                f"({first.where}: {first.tokenizer_sha[:12]}, {ds.where}: {ds.tokenizer_sha[:12]})")
    if model_vocab is not None and first.vocab_size > model_vocab:
        raise fmt.DataError(f"{first.where}: tokenizer vocabulary {first.vocab_size} exceeds the model's "
                            f"vocab_size {model_vocab}")
    return datasets


def _stage_key(cfg: DataConfig) -> dict:
    return {"seq_length": cfg.seq_length, "packing": cfg.packing, "pack_window": cfg.pack_window}


class Mixture:
    """One slot's sequences: a packer per source, chosen by smooth weighted round-robin."""

    def __init__(self, cfg: DataConfig, datasets: list[Dataset], slot: int, n_slots: int, saved: dict | None):
        self.cfg, self.datasets = cfg, datasets
        self.weights = np.array(cfg.weights())
        saved = saved or {}
        self.policy = ErrorPolicy(cfg.on_error, cfg.max_skip_fraction, saved.get("skips"))
        self.reads = Counters.from_state(saved.get("reads"))  # what reads from object storage cost
        mix = saved.get("mixture", {})
        same_mix = mix.get("names") == [d.name for d in datasets] and np.allclose(mix.get("weights", []), self.weights)
        self.counts = np.array(mix["counts"] if same_mix else [0] * len(datasets), dtype=np.int64)
        self.streams, self.packers = [], []
        for ds in datasets:
            s = saved.get("sources", {}).get(ds.name, {})
            start = s.get("packer", {}).get("at") or s.get("live")
            stream = SlotStream(ds, slot, n_slots, cfg.seed, cfg.shuffle_window, ds.vocab_size, self.policy,
                                exclude=s.get("exclude"), position=start, counters=self.reads)
            packer_state = s.get("packer")
            if cfg.packing == "concat":
                packer = ConcatPacker(stream, cfg.seq_length, packer_state)
            else:
                packer = BestFitPacker(stream, cfg.seq_length, cfg.pack_window, cfg.seed, packer_state)
            if cfg.record:
                stream.record = []
            self.streams.append(stream)
            self.packers.append(packer)

    def batch(self, size: int) -> np.ndarray:
        """The next `size` sequences, packed in one int64 array (see `unpack`)."""
        if self.cfg.packing == "concat":
            out = np.empty((size, self.cfg.seq_length + 1), dtype=np.int64)
        else:
            out = np.empty((5, size, self.cfg.seq_length), dtype=np.int64)
        for row in range(size):
            i = int(np.argmax(self.weights * (self.counts.sum() + 1) - self.counts))
            self.counts[i] += 1
            self.packers[i].fill(out[row] if self.cfg.packing == "concat" else out[:, row])
        return out

    def delivered(self) -> list:
        """What the streams emitted since the last call (cfg.record), and clear it."""
        out = []
        for st in self.streams:
            if st.record:
                out += st.record
                st.record.clear()
        return out

    def state(self) -> dict:
        return {"mixture": {"names": [d.name for d in self.datasets], "weights": self.weights.tolist(),
                            "counts": self.counts.tolist()},
                "skips": self.policy.state(), "reads": self.reads.state(),
                "sources": {ds.name: {"dataset": ds.identity, "live": st.position(), "packer": p.state(),
                                      "exclude": {str(e): v for e, v in st.exclude.items()}}
                            for ds, st, p in zip(self.datasets, self.streams, self.packers)}}


def unpack(packed: torch.Tensor, packing: str) -> dict:
    """One tensor per batch crosses from a worker (one shared-memory segment); the fields are views of it."""
    if packing == "concat":
        b, s = packed.shape[0], packed.shape[1] - 1
        return {"tokens": packed[:, :-1], "labels": packed[:, 1:], "loss_mask": torch.ones(b, s),
                "position_ids": torch.arange(s).expand(b, s)}
    tokens, labels, mask, positions, segments = packed
    return {"tokens": tokens, "labels": labels, "loss_mask": mask.float(), "position_ids": positions,
            "segment_ids": segments}


def _as_is(item):
    return item


def _ignore_stop_signals(worker_id: int) -> None:
    # A scheduler stops a job by signalling every process in it (Slurm's SIGTERM at a time limit,
    # `--signal=USR1`). The process that owns the loader decides when to stop, and may still need
    # batches before it does; its workers end with it (DataLoader watches its parent).
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class _WorkerError(str):
    """A DataError raised in a dataloader worker, carried to the main process as data."""


class _Slots(IterableDataset):
    """What each dataloader worker runs: its logical worker's mixture, in micro-batches."""

    def __init__(self, cfg, datasets, rank, n_ranks, n_workers, micro_batch, saved, first):
        self.cfg, self.datasets, self.rank, self.n_ranks = cfg, datasets, rank, n_ranks
        self.n_workers, self.micro_batch, self.saved, self.first = n_workers, micro_batch, saved, first

    def __iter__(self):
        info = get_worker_info()
        # DataLoader always asks physical worker 0 first; start it on the logical worker that is due
        w = ((info.id if info else 0) + self.first) % self.n_workers
        try:
            mixture = Mixture(self.cfg, self.datasets, self.rank * self.n_workers + w,
                              self.n_ranks * self.n_workers, self.saved[w])
            while True:
                batch = torch.from_numpy(mixture.batch(self.micro_batch))
                yield batch, w, mixture.state(), mixture.delivered() if self.cfg.record else None
        except fmt.DataError as e:
            # to the training process as the message itself: DataLoader would wrap it in its own
            # traceback of the worker
            yield _WorkerError(str(e)), w, None, None


class TokenLoader:
    """Iterate for micro-batches of {tokens, labels, loss_mask, position_ids[, segment_ids]} (int64/float32,
    shape [micro_batch, seq_length]); `state_dict()` after any batch resumes right after it.
    part="validation" reads only the held-out shards (cfg.holdout_shards), "train" all the others."""

    def __init__(self, cfg: DataConfig, micro_batch: int, rank: int = 0, n_ranks: int = 1,
                 model_vocab: int | None = None, states: list[dict] | None = None, pin_memory: bool = False,
                 part: str = "train"):
        cfg.validate()
        self.cfg, self.micro_batch, self.rank, self.n_ranks = cfg, micro_batch, rank, n_ranks
        self.n_workers = max(1, cfg.num_workers)
        self.pin_memory = pin_memory
        self.datasets = open_sources(cfg, model_vocab, part)
        self.layout = {"n_ranks": n_ranks, "workers": self.n_workers, "seed": cfg.seed,
                       "shuffle_window": cfg.shuffle_window}
        # a re-deal to another number of readers: what it dropped (the rest of each old reader's started
        # shards) and from how many readers to how many; None when the layout is the saved one
        self.redealt: dict | None = None
        # cfg.record: (epoch, source, shard, sample) of what the batches taken so far delivered; the
        # caller empties it
        self.delivered: list = []
        self.worker_states, self.next_worker = self._restore(states)

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "layout": dict(self.layout), "stage": _stage_key(self.cfg),
                "rank": self.rank, "next_worker": self.next_worker, "workers": copy.deepcopy(self.worker_states)}

    def stats(self) -> dict:
        """Counts for the training metrics (this rank): bad data skipped (shards, samples and tokens,
        in total and per source as `skipped_tokens/<source>`), sequences drawn per source, and what reads
        from object storage cost (read_retries, read_seconds, read_bytes)."""
        out = sum_counts([w.get("skips") for w in self.worker_states])
        reads = Counters.total(w.get("reads") for w in self.worker_states)
        out.update(read_retries=reads.retries, read_seconds=reads.seconds, read_bytes=reads.bytes)
        for w in self.worker_states:
            mix = w.get("mixture", {})
            for name, n in zip(mix.get("names", []), mix.get("counts", [])):
                out[f"sequences/{name}"] = out.get(f"sequences/{name}", 0) + n
        return out

    def _restore(self, states: list[dict] | None) -> tuple[list[dict], int]:
        fresh = [{} for _ in range(self.n_workers)]
        if not states:
            return fresh, 0
        for s in states:
            if s.get("version") != STATE_VERSION:
                raise fmt.DataError(f"loader state version {s.get('version')} is not {STATE_VERSION}")
        old_layout = states[0]["layout"]
        if len(states) != old_layout["n_ranks"]:
            raise fmt.DataError(f"loader state: {len(states)} rank states given, the saved run had "
                                f"{old_layout['n_ranks']}; pass every rank's state")
        known = {ds.name: ds.identity for ds in self.datasets}
        for s in states:
            for w in s["workers"]:
                for name, src in w.get("sources", {}).items():
                    if name in known and src["dataset"] != known[name]:
                        raise fmt.DataError(f"source '{name}': the saved position belongs to another version of "
                                            "the dataset (its shards changed since the checkpoint)")
        if old_layout == self.layout:
            mine = states[self.rank]
            same_stage = mine["stage"] == _stage_key(self.cfg)
            workers = []
            for w in mine["workers"]:
                sources = {n: (src if same_stage else {"live": src["live"], "exclude": src["exclude"]})
                           for n, src in w.get("sources", {}).items() if n in known}
                workers.append({**w, "sources": sources})
            return workers, mine["next_worker"] if same_stage else 0
        return self._redeal(states), 0

    def _redeal(self, states: list[dict]) -> list[dict]:
        """Start every new slot where the old slots, taken together, had got to (shard granularity)."""
        old = states[0]["layout"]
        n_old = old["n_ranks"] * old["workers"]
        sources = {}
        dropped = 0
        for ds in self.datasets:
            olds = [(s["rank"] * old["workers"] + w, src["live"], src["exclude"])
                    for s in states for w, ws in enumerate(s["workers"])
                    for n, src in ws.get("sources", {}).items() if n == ds.name]
            if not olds:
                continue
            streams = [SlotStream(ds, slot, n_old, old["seed"], old["shuffle_window"], ds.vocab_size, ErrorPolicy(),
                                  exclude=excl, position=live) for slot, live, excl in olds]
            dropped += sum(st.left_in_started_shards() for st in streams)
            first = min(st.pos["epoch"] for st in streams)
            last = max(st.pos["epoch"] for st in streams)
            exclude = {str(e): sorted({s for st in streams for s in [*st.exclude.get(e, ()), *st.consumed_shards(e)]})
                       for e in range(first, last + 1)}
            sources[ds.name] = {"live": {"epoch": first, "window": 0, "emitted": 0}, "exclude": exclude}
        # the skips counted so far move to the first new reader (the shards they name are behind
        # every reader now)
        merged = ErrorPolicy.merged([w.get("skips") for s in states for w in s["workers"]])
        reads = Counters.total(w.get("reads") for s in states for w in s["workers"])
        self.redealt = {"from_readers": n_old, "to_readers": self.n_ranks * self.n_workers,
                        "dropped_samples": dropped}
        return [{"sources": copy.deepcopy(sources), "skips": merged if i == 0 and self.rank == 0 else None,
                 "reads": reads.state() if i == 0 and self.rank == 0 else None}
                for i in range(self.n_workers)]

    # --- iteration ---------------------------------------------------------------------------------
    def producer(self) -> IterableDataset:
        """What the dataloader workers run: yields (packed batch, logical worker, its state after the batch)."""
        return _Slots(self.cfg, self.datasets, self.rank, self.n_ranks, self.n_workers, self.micro_batch,
                      copy.deepcopy(self.worker_states), self.next_worker)

    def __iter__(self):
        slots = self.producer()
        loader = DataLoader(slots, batch_size=None, num_workers=self.cfg.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.cfg.num_workers else None, collate_fn=_as_is,
                            worker_init_fn=_ignore_stop_signals)
        for packed, w, state, delivered in loader:
            if isinstance(packed, _WorkerError):
                raise fmt.DataError(str(packed))
            self.worker_states[w] = state
            if delivered:
                self.delivered += delivered
            self.next_worker = (w + 1) % self.n_workers
            yield unpack(packed, self.cfg.packing)

    def take(self, n: int) -> list[dict]:
        """The next n micro-batches (convenience for inspection and tests)."""
        return list(itertools.islice(iter(self), n))
