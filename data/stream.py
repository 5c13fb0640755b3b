"""Reading prepared datasets as endless, seeded, exactly resumable streams of stored samples.

A reader ("slot": one dataloader worker of one data-parallel rank) owns a disjoint share of a
dataset's shards in each epoch: the shard order is a seeded permutation per epoch, dealt round-robin
to the slots. Within its share, a slot reads samples in order and shuffles them in windows of
`window` samples. The permutation of a window depends only on (seed, dataset, slot, epoch, window),
so a slot's position is three integers {epoch, window, emitted} and resuming re-reads at most one
window. (A classic shuffle buffer would need its contents saved to resume exactly.)

WebDataset supplies the URL handling (local paths, `pipe:` commands, http) and the tar parsing;
what it lacks - exact resumption and a per-epoch disjoint split - lives here, and reading from
object storage (`s3://`) through network faults in data/objstore.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tarfile
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import webdataset as wds
import zstandard
from braceexpand import braceexpand

from data import format as fmt
from data import objstore
from data.fim import rng_for
from data.objstore import Counters, Retries

log = logging.getLogger(__name__)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "ais:")  # URLs that name a manifest, not a directory


def open_url(url: str, retries: Retries = Retries(), counters: Counters | None = None):
    """A file object reading `url`: s3:// through data/objstore.py (resumed through transient faults),
    anything else through WebDataset's gopen (a path, pipe:, http(s) with curl)."""
    if objstore.is_url(url):
        return objstore.open_read(url, retries, counters)
    return wds.gopen(url, "rb")


@dataclass
class Dataset:
    """A prepared dataset as the loader sees it: its manifest and one URL per shard."""
    name: str
    manifest: dict
    urls: list[str]
    where: str  # the manifest's location, for messages
    retries: Retries = Retries()  # how reads from object storage try again

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


def open_dataset(name: str, path: str, urls: str | None = None, retries: Retries = Retries()) -> Dataset:
    """`path`: a prepared directory (local, or an s3:// prefix), or a manifest.json path/URL; `urls`: a
    brace pattern for the shards (needed when the manifest comes through a `pipe:` command; optional
    otherwise)."""
    remote = path.startswith(REMOTE_PREFIXES)
    manifest_url = path if remote or path.endswith(".json") else f"{path.rstrip('/')}/{fmt.MANIFEST}"
    try:
        with open_url(manifest_url, retries) as f:
            raw = f.read()
    except Exception as e:
        missing = isinstance(e, FileNotFoundError) or "404" in str(e)
        raise fmt.DataError(f"source '{name}': cannot read manifest {manifest_url} ({e})" +
                            ("; run `glm-data prepare` first" if missing else "")) from None
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
    return Dataset(name, manifest, shard_urls, manifest_url, retries)


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
    return Dataset(ds.name, manifest, ds.urls[keep], ds.where, ds.retries)


def slot_shards(ds: Dataset, seed: int, epoch: int, slot: int, n_slots: int, exclude=()) -> list[int]:
    """The shards (manifest indices) that `slot` of `n_slots` reads in `epoch`, in reading order."""
    order = rng_for(seed, ds.name, "shards", str(epoch)).permutation(len(ds.urls))
    skip = set(exclude)
    return [int(s) for s in order if s not in skip][slot::n_slots]


# A skipped share is judged once a reader has read this many samples of a source (or a whole pass
# over its shards, if sooner): before that a single bad shard would be a large share of very little.
JUDGE_SAMPLES = 1000
LOG_IN_FULL = 5  # skips logged with their whole message; after that, a summary at most every minute
LOG_EVERY_S = 60.0


class ErrorPolicy:
    """What happens to a bad shard. `fail`: its DataError stops the run. `skip`: the shard is skipped
    whole (none of its samples delivered) and counted per source, in shards, samples and tokens (the
    manifest's numbers); a source whose skipped share of what it has read passes `max_fraction`
    stops the run, naming the source, the shards and the counts.

    One policy per reader (a data-parallel rank's dataloader worker); its state is saved with the
    reader's, and a shard already counted (a resumed reader re-reads its window) is not counted again.
    """

    def __init__(self, mode: str = "fail", max_fraction: float = 0.01, state: dict | None = None):
        self.mode, self.max_fraction = mode, max_fraction
        state = state or {}
        self.counts: dict[str, dict[str, int]] = {k: dict(v) for k, v in state.get("counts", {}).items()}
        self.bad: dict[str, str] = dict(state.get("bad", {}))  # "source:epoch:shard" -> reason
        self._logged, self._last_summary = 0, 0.0

    def state(self) -> dict:
        return {"counts": {k: dict(v) for k, v in self.counts.items()}, "bad": dict(self.bad)}

    @classmethod
    def merged(cls, states: list[dict | None]) -> dict:
        """One state holding the counts and bad shards of several readers' states."""
        out = cls()
        for state in states:
            for name, c in (state or {}).get("counts", {}).items():
                mine = out._source(name)
                for k, v in c.items():
                    mine[k] += v
            out.bad.update((state or {}).get("bad", {}))
        return out.state()

    def _source(self, name: str) -> dict[str, int]:
        return self.counts.setdefault(name, {"shards": 0, "samples": 0, "tokens": 0, "read_samples": 0})

    def opened(self, ds: "Dataset", index: int, epoch: int) -> None:
        """A reader starts shard `index` (counted towards the share read, once per epoch)."""
        key = f"{ds.name}:{epoch}:{index}"
        if key not in self.bad:
            self._source(ds.name)["read_samples"] += ds.samples[index]

    def skip(self, ds: "Dataset", index: int, epoch: int, err: fmt.DataError) -> None:
        """Shard `index` is bad: raise in `fail` mode; in `skip` mode count it (once) and log it."""
        if self.mode == "fail":
            raise err
        key = f"{ds.name}:{epoch}:{index}"
        if key in self.bad:
            return
        self.bad[key] = str(err)
        shard = ds.manifest["shards"][index]
        c = self._source(ds.name)
        c["shards"] += 1
        c["samples"] += shard["samples"]
        c["tokens"] += shard["tokens"]
        self._logged += 1
        now = time.monotonic()
        if self._logged <= LOG_IN_FULL:
            log.warning("skipping bad shard (%d samples, %d tokens of source '%s'): %s",
                        shard["samples"], shard["tokens"], ds.name, err)
        elif now - self._last_summary >= LOG_EVERY_S:
            self._last_summary = now
            log.warning("skipping bad data: %s", self.describe())

    def judge(self, ds: "Dataset", whole_pass: bool) -> None:
        """Stop the run if `ds`'s skipped share of what this reader has read is past the ceiling."""
        c = self.counts.get(ds.name)
        if self.mode == "fail" or not c or not c["shards"]:
            return
        read = c["read_samples"]
        if not whole_pass and read < JUDGE_SAMPLES:
            return
        share = c["samples"] / max(read, 1)
        if share > self.max_fraction:
            shards = sorted({int(k.rsplit(":", 1)[1]) for k in self.bad if k.split(":")[0] == ds.name})
            names = ", ".join(ds.manifest["shards"][i]["name"] for i in shards[:8])
            first = next(v for k, v in self.bad.items() if k.split(":")[0] == ds.name)
            raise fmt.DataError(
                f"source '{ds.name}' ({ds.where}): skipped {c['shards']} bad shard(s), {c['samples']:,} samples and "
                f"{c['tokens']:,} tokens, {share:.1%} of the {read:,} samples this reader has read, more than "
                f"data.max_skip_fraction={self.max_fraction}; bad shards: {names}{' ...' if len(shards) > 8 else ''}; "
                f"the first: {first}")

    def describe(self) -> str:
        return "; ".join(f"source '{n}': {c['shards']} shard(s), {c['samples']:,} samples, {c['tokens']:,} tokens "
                         f"skipped of {c['read_samples']:,} samples read" for n, c in self.counts.items() if c["shards"])


def sum_counts(states: list[dict]) -> dict[str, int]:
    """Skip counters of several readers' policy states, per source and in total, for reports:
    skipped_{shards,samples,tokens} and skipped_<kind>/<source>."""
    out = {"skipped_shards": 0, "skipped_samples": 0, "skipped_tokens": 0}
    for state in states:
        for name, c in (state or {}).get("counts", {}).items():
            for kind in ("shards", "samples", "tokens"):
                out[f"skipped_{kind}"] += c[kind]
                out[f"skipped_{kind}/{name}"] = out.get(f"skipped_{kind}/{name}", 0) + c[kind]
    return out


class _HashingReader:
    """Passes a byte stream through while hashing and counting it, so a shard's checks cost no second read."""

    def __init__(self, stream):
        self.stream, self.sha, self.bytes = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()


def read_shard(ds: Dataset, index: int, counters: Counters | None = None) -> Iterator[tuple[str, dict]]:
    """(where, raw sample) for each sample of shard `index`. At its end the shard must agree with the
    manifest in every way (samples, bytes, sha256), or DataError: read it to the end to be sure.
    `counters`: what reads from object storage cost (retries, seconds, bytes)."""
    url, expected = ds.urls[index], ds.manifest["shards"][index]
    try:
        stream = open_url(url, ds.retries, counters)
    except Exception as e:
        raise fmt.DataError(f"{url}: missing or unreadable shard ({e}); listed in {ds.where}") from None
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
    except objstore.ObjectStoreError as e:  # the store, for good: named as such, not as a damaged tar
        after = f"after sample {key}" if key else "before its first sample"
        raise fmt.DataError(f"{e.message} ({after}; listed in {ds.where})") from None
    except (tarfile.TarError, OSError, EOFError, ValueError, zstandard.ZstdError) as e:
        after = f"after sample {key}" if key else "before its first sample"
        reason = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__  # webdataset appends the stream
        raise fmt.DataError(f"{url}: truncated or unreadable tar {after} ({reason})") from None
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe: command that failed reports it on close
            if complete:
                raise fmt.DataError(f"{url}: {e}") from None
    if count != expected["samples"]:
        problem = "ended early: truncated?" if count < expected["samples"] else "holds more: changed?"
        raise fmt.DataError(f"{url}: {count} samples, but {ds.where} lists {expected['samples']} ({problem})")
    if "bytes" in expected and reader.bytes != expected["bytes"]:
        raise fmt.DataError(f"{url}: {reader.bytes:,} bytes, but {ds.where} lists {expected['bytes']:,}")
    if digest != expected["sha256"]:
        raise fmt.DataError(f"{url}: contents do not match {ds.where} (sha256 {digest[:12]}..., "
                            f"manifest {expected['sha256'][:12]}...)")


def decoded_shard(ds: Dataset, index: int, counters: Counters | None = None
                  ) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, tokens, metadata) of each sample of shard `index`, in order; DataError at the first problem."""
    decompressor = zstandard.ZstdDecompressor()
    for where, raw in read_shard(ds, index, counters):
        yield (raw["__key__"], *fmt.decode_sample(raw, ds.dtype, ds.vocab_size, where, decompressor))


def check_shard(ds: Dataset, index: int, counters: Counters | None = None) -> fmt.DataError | None:
    """Read shard `index` whole: None if it agrees with the manifest and every sample decodes, else
    what is wrong. The loader's skip mode and `glm-data inspect --verify` judge shards by this."""
    tokens = documents = 0
    try:
        for _, t, meta in decoded_shard(ds, index, counters):
            tokens += len(t)
            documents += len(meta["lengths"])
    except fmt.DataError as e:
        return e
    expected = ds.manifest["shards"][index]
    for what, got in (("tokens", tokens), ("documents", documents)):
        if what in expected and got != expected[what]:
            return fmt.DataError(f"{ds.urls[index]}: {got:,} {what}, but {ds.where} lists {expected[what]:,}")
    return None


class SlotStream:
    """One slot's endless stream of decoded samples (tokens, metadata) from one dataset."""

    def __init__(self, ds: Dataset, slot: int, n_slots: int, seed: int, window: int, vocab_size: int,
                 policy: ErrorPolicy, exclude: dict | None = None, position: dict | None = None,
                 counters: Counters | None = None):
        self.ds, self.slot, self.n_slots, self.seed, self.window = ds, slot, n_slots, seed, window
        self.vocab_size, self.policy, self.counters = vocab_size, policy, counters
        self.exclude = {int(e): list(s) for e, s in (exclude or {}).items()}
        self.pos = dict(position or {"epoch": 0, "window": 0, "emitted": 0})
        self._epoch_cache: tuple[int, list[int], np.ndarray] | None = None
        self._buffer: list | None = None  # the current window: [(where, raw) or None], and its order
        self._reader: dict | None = None  # the open shard: its place, iterator and next offset
        self._decompressor = zstandard.ZstdDecompressor()
        self.record: list | None = None  # when a list: (epoch, source, shard, sample) of each one emitted
        self._bad_in_a_row = 0  # skip mode: consecutive bad shards (a whole pass of them ends the run)
        self._opened = 0  # skip mode: shards this reader has opened
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

    def _open(self, shard: int) -> Iterator:
        """The samples of `shard`. In skip mode the shard is checked whole first, and a bad one
        gives none of its samples (skipped and counted); in fail mode it is read as it streams and
        a problem raises where it shows."""
        epoch = self.pos["epoch"]
        self.policy.opened(self.ds, shard, epoch)
        if self.policy.mode == "skip":
            shards, _ = self._epoch(epoch)
            self._opened += 1
            whole_pass = self._opened >= len(shards)  # as many shards as one pass of this reader
            err = check_shard(self.ds, shard, self.counters)
            if err is None:
                self._bad_in_a_row = 0
            else:
                self.policy.skip(self.ds, shard, epoch, err)
                self._bad_in_a_row += 1
                if self._bad_in_a_row >= len(shards):
                    self.policy.judge(self.ds, whole_pass=True)
                    raise fmt.DataError(f"source '{self.ds.name}': a whole pass over the {len(shards)} shard(s) "
                                        f"reader {self.slot} reads delivered nothing: every one was bad; "
                                        f"{self.policy.describe()}; the last: {err}")
            self.policy.judge(self.ds, whole_pass)
            if err is not None:
                return iter(())
        return read_shard(self.ds, shard, self.counters)

    def _sample_at(self, shards: list[int], starts: np.ndarray, offset: int):
        """The raw sample at `offset` of this epoch's stream, reading forward (None if lost to bad data)."""
        i = int(np.searchsorted(starts, offset, side="right")) - 1
        key, within, r = (self.pos["epoch"], i), offset - int(starts[i]), self._reader
        if r is None or r["key"] != key or r["next"] > within:
            if r is not None and r["next"] == self.ds.samples[r["shard"]]:
                for _ in r["it"]:  # a fully read shard: read to its end, where it is checked
                    pass
            r = self._reader = {"key": key, "shard": shards[i], "next": 0, "it": self._open(shards[i])}
        found = None
        while r["next"] <= within:
            found = next(r["it"], None)
            if found is None:  # a skipped shard: all of it is lost
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
        self._buffer = [items, order.permutation(len(items)), begin]

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict]]:
        return self

    def __next__(self) -> tuple[np.ndarray, dict]:
        while True:
            if self._buffer is None:
                self._load_window()
            items, order, begin = self._buffer
            if self.pos["emitted"] >= len(items):
                self.pos = {**self.pos, "window": self.pos["window"] + 1, "emitted": 0}
                self._buffer = None
                continue
            item = items[order[self.pos["emitted"]]]
            offset = begin + int(order[self.pos["emitted"]])
            self.pos["emitted"] += 1
            if item is None:
                continue
            if self.record is not None:
                shards, starts = self._epoch(self.pos["epoch"])
                i = int(np.searchsorted(starts, offset, side="right")) - 1
                self.record.append((self.pos["epoch"], self.ds.name, shards[i], offset - int(starts[i])))
            where, raw = item
            return fmt.decode_sample(raw, self.ds.dtype, self.vocab_size, where, self._decompressor)

    def left_in_started_shards(self) -> int:
        """Samples of the shards this slot has started that it has not emitted: what a re-deal to a
        new layout drops (consumed_shards go to nobody)."""
        e = self.pos["epoch"]
        shards, starts = self._epoch(e)
        started = len(self.consumed_shards(e))
        return max(0, int(starts[started]) - (self.pos["window"] * self.window + self.pos["emitted"]))

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
