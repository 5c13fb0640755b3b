"""Reading prepared datasets as endless, seeded, exactly resumable streams of stored samples.

A reader ("slot": one dataloader worker of one data-parallel rank) owns a disjoint share of a
dataset's shards in each epoch: the shard order is a seeded permutation per epoch, dealt round-robin
to the slots. Within its share, a slot reads samples in order and shuffles them in windows of
`window` samples. The permutation of a window depends only on (seed, dataset, slot, epoch, window),
so a slot's position is three integers {epoch, window, emitted} and resuming re-reads at most one
window. (A classic shuffle buffer would need its contents saved to resume exactly.)

WebDataset supplies the URL handling (local paths, `pipe:` commands, http) and the tar parsing;
what it lacks - exact resumption and a per-epoch disjoint split - lives here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import webdataset as wds
import zstandard
from braceexpand import braceexpand

from data import format as fmt
from data.fim import rng_for

log = logging.getLogger(__name__)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais:")


@dataclass
class Dataset:
    """A prepared dataset as the loader sees it: its manifest and one URL per shard."""
    name: str
    manifest: dict
    urls: list[str]
    where: str  # the manifest's location, for messages

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def tokenizer_sha(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @functools.cached_property
    def samples(self) -> list[int]:
        return [s["samples"] for s in self.manifest["shards"]]

    @functools.cached_property
    def identity(self) -> str:
        """Changes whenever any shard changes; a saved position is only meaningful for the same identity."""
        return hashlib.sha256("".join(s["sha256"] for s in self.manifest["shards"]).encode()).hexdigest()[:16]


def open_dataset(name: str, path: str, urls: str | None = None) -> Dataset:
    """`path`: a prepared directory, or a manifest.json path/URL; `urls`: a brace pattern for the shards
    (needed when the manifest comes through a `pipe:` command; optional otherwise)."""
    remote = path.startswith(REMOTE_PREFIXES)
    manifest_url = path if remote or path.endswith(".json") else os.path.join(path, fmt.MANIFEST)
    try:
        with wds.gopen(manifest_url, "rb") as f:
            raw = f.read()
    except Exception as e:
        raise fmt.DataError(f"source '{name}': cannot read manifest {manifest_url} ({e}); "
                            "run `glm-data prepare` first") from None
    try:
        manifest = fmt.check_manifest(json.loads(raw), manifest_url)
    except json.JSONDecodeError as e:
        raise fmt.DataError(f"{manifest_url}: manifest is not valid JSON ({e})") from None
    names = [s["name"] for s in manifest["shards"]]
    if urls:
        shard_urls = list(braceexpand(urls))
        if len(shard_urls) != len(names):
            raise fmt.DataError(f"source '{name}': urls {urls!r} expand to {len(shard_urls)} shards, but "
                                f"{manifest_url} lists {len(names)}")
        for u, n in zip(shard_urls, names):
            if n not in u:
                raise fmt.DataError(f"source '{name}': shard URL {u!r} does not name {n}, the manifest's "
                                    "shard in that place (urls must follow the manifest's order)")
    elif path.startswith("pipe:"):
        raise fmt.DataError(f"source '{name}': a manifest read through a pipe: command needs `urls` for its shards")
    else:
        base = manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else "."
        shard_urls = [f"{base}/{n}" for n in names]
    return Dataset(name, manifest, shard_urls, manifest_url)


def held_out(ds: Dataset, shards: int, part: str) -> Dataset:
    """The training part (all but the last `shards` shards) or the validation part (those last
    shards) of a dataset. The part's identity covers only its own shards, so a saved position is
    refused when the hold-out changes."""
    n = len(ds.urls)
    if part not in ("train", "validation"):
        raise ValueError(f"part={part!r}: expected train or validation")
    if shards and shards >= n:
        raise fmt.DataError(f"source '{ds.name}': holdout_shards={shards} leaves none of its {n} shards to train on")
    if part == "validation" and not shards:
        raise fmt.DataError(f"source '{ds.name}': no validation part (holdout_shards is 0)")
    keep = slice(n - shards, n) if part == "validation" else slice(0, n - shards)
    manifest = {**ds.manifest, "shards": ds.manifest["shards"][keep]}
    return Dataset(ds.name, manifest, ds.urls[keep], ds.where)


def slot_shards(ds: Dataset, seed: int, epoch: int, slot: int, n_slots: int, exclude=()) -> list[int]:
    """The shards (manifest indices) that `slot` of `n_slots` reads in `epoch`, in reading order."""
    order = rng_for(seed, ds.name, "shards", str(epoch)).permutation(len(ds.urls))
    skip = set(exclude)
    return [int(s) for s in order if s not in skip][slot::n_slots]


@dataclass
class ErrorPolicy:
    """`fail`: bad data raises DataError. `skip`: it is logged and counted, and reading goes on."""
    mode: str = "fail"
    counts: dict = field(default_factory=lambda: {"skipped_samples": 0, "skipped_shards": 0})

    def bad(self, err: fmt.DataError, what: str) -> None:
        if self.mode == "fail":
            raise err
        self.counts[what] += 1
        log.warning("skipping bad data (%s #%d): %s", what, self.counts[what], err)


class _HashingReader:
    """Passes a byte stream through while hashing it, so a shard's checksum costs no second read."""

    def __init__(self, stream):
        self.stream, self.sha = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def read_shard(ds: Dataset, index: int, policy: ErrorPolicy) -> Iterator[tuple[str, dict]]:
    """(where, raw sample) for each sample of shard `index`; checks the count and the checksum at the end."""
    url, expected = ds.urls[index], ds.manifest["shards"][index]
    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:
        policy.bad(fmt.DataError(f"{url}: missing or unreadable shard ({e}); listed in {ds.where}"), "skipped_shards")
        return
    reader = _HashingReader(stream)
    count, key, complete = 0, None, False
    try:
        grouped = wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": reader}]))
        for raw in grouped:
            key = raw["__key__"]
            count += 1
            yield f"{url} sample {key}", raw
        digest = reader.drain()
        complete = True
    except (tarfile.TarError, OSError, EOFError, ValueError, zstandard.ZstdError) as e:
        after = f"after sample {key}" if key else "before its first sample"
        reason = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__  # webdataset appends the stream
        policy.bad(fmt.DataError(f"{url}: truncated or unreadable tar {after} ({reason})"), "skipped_shards")
        return
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe: command that failed reports it on close
            if complete:
                policy.bad(fmt.DataError(f"{url}: {e}"), "skipped_shards")
                return
    if count != expected["samples"]:
        problem = "ended early: truncated?" if count < expected["samples"] else "holds more: changed?"
        policy.bad(fmt.DataError(f"{url}: {count} samples, but {ds.where} lists {expected['samples']} ({problem})"),
                   "skipped_shards")
    elif digest != expected["sha256"]:
        policy.bad(fmt.DataError(f"{url}: contents do not match {ds.where} (sha256 {digest[:12]}..., "
                                 f"manifest {expected['sha256'][:12]}...)"), "skipped_shards")


def decoded_shard(ds: Dataset, index: int, policy: ErrorPolicy) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, tokens, metadata) of each good sample of shard `index`, in order; bad ones go to `policy`."""
    decompressor = zstandard.ZstdDecompressor()
    for where, raw in read_shard(ds, index, policy):
        try:
            yield (raw["__key__"], *fmt.decode_sample(raw, ds.dtype, ds.vocab_size, where, decompressor))
        except fmt.DataError as e:
            policy.bad(e, "skipped_samples")


class SlotStream:
    """One slot's endless stream of decoded samples (tokens, metadata) from one dataset."""

    def __init__(self, ds: Dataset, slot: int, n_slots: int, seed: int, window: int, vocab_size: int,
                 policy: ErrorPolicy, exclude: dict | None = None, position: dict | None = None):
        self.ds, self.slot, self.n_slots, self.seed, self.window = ds, slot, n_slots, seed, window
        self.vocab_size, self.policy = vocab_size, policy
        self.exclude = {int(e): list(s) for e, s in (exclude or {}).items()}
        self.pos = dict(position or {"epoch": 0, "window": 0, "emitted": 0})
        self._epoch_cache: tuple[int, list[int], np.ndarray] | None = None
        self._buffer: list | None = None  # the current window: [(where, raw) or None], and its order
        self._reader: dict | None = None  # the open shard: its place, iterator and next offset
        self._decompressor = zstandard.ZstdDecompressor()
        if len(ds.urls) < n_slots:
            raise fmt.DataError(f"source '{ds.name}': {len(ds.urls)} shards cannot feed {n_slots} readers "
                                "(data-parallel ranks x dataloader workers); prepare it with a smaller "
                                "--shard-tokens, or use fewer workers")

    def position(self) -> dict:
        return dict(self.pos)

    def _epoch(self, epoch: int) -> tuple[list[int], np.ndarray]:
        """This slot's shards in `epoch` and the offsets at which each starts in its stream."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            shards = slot_shards(self.ds, self.seed, epoch, self.slot, self.n_slots, self.exclude.get(epoch, ()))
            counts = [self.ds.samples[s] for s in shards]
            self._epoch_cache = (epoch, shards, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def _sample_at(self, shards: list[int], starts: np.ndarray, offset: int):
        """The raw sample at `offset` of this epoch's stream, reading forward (None if lost to bad data)."""
        i = int(np.searchsorted(starts, offset, side="right")) - 1
        key, within, r = (self.pos["epoch"], i), offset - int(starts[i]), self._reader
        if r is None or r["key"] != key or r["next"] > within:
            if r is not None and r["next"] == self.ds.samples[r["shard"]]:
                next(r["it"], None)  # a fully read shard: let it check its count and checksum
            r = self._reader = {"key": key, "shard": shards[i], "next": 0,
                                "it": read_shard(self.ds, shards[i], self.policy)}
        found = None
        while r["next"] <= within:
            found = next(r["it"], None)
            if found is None:  # the shard ended early (bad data skipped): the rest of it is lost
                r["next"] = within + 1
                return None
            r["next"] += 1
        return found

    def _load_window(self) -> None:
        for _ in range(len(self.exclude) + 2):  # an epoch can be empty for this slot only through exclusions
            shards, starts = self._epoch(self.pos["epoch"])
            begin = self.pos["window"] * self.window
            if begin < starts[-1]:
                break
            self.pos = {"epoch": self.pos["epoch"] + 1, "window": 0, "emitted": 0}
        else:
            raise fmt.DataError(f"source '{self.ds.name}': slot {self.slot} has no shards to read")
        end = min(begin + self.window, int(starts[-1]))
        items = [self._sample_at(shards, starts, o) for o in range(begin, end)]
        order = rng_for(self.seed, self.ds.name, str(self.slot), str(self.pos["epoch"]), str(self.pos["window"]))
        self._buffer = [items, order.permutation(len(items))]

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict]]:
        return self

    def __next__(self) -> tuple[np.ndarray, dict]:
        while True:
            if self._buffer is None:
                self._load_window()
            items, order = self._buffer
            if self.pos["emitted"] >= len(items):
                self.pos = {**self.pos, "window": self.pos["window"] + 1, "emitted": 0}
                self._buffer = None
                continue
            item = items[order[self.pos["emitted"]]]
            self.pos["emitted"] += 1
            if item is None:
                continue
            where, raw = item
            try:
                return fmt.decode_sample(raw, self.ds.dtype, self.vocab_size, where, self._decompressor)
            except fmt.DataError as e:
                self.policy.bad(e, "skipped_samples")

    def consumed_shards(self, epoch: int) -> list[int]:
        """Shards of `epoch` this slot has started reading (for re-dealing shards to a new layout)."""
        e = self.pos["epoch"]
        if epoch > e:
            return []
        shards, starts = self._epoch(epoch)
        if epoch < e:
            return shards
        end = self.pos["window"] * self.window + (self.window if self.pos["emitted"] else 0)
        return [s for s, start in zip(shards, starts[:-1]) if start < end]
