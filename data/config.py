"""The data side of a training stage, as a Hydra structured config (configs/data/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class DataConfigError(ValueError):
    """A data config value that cannot work; the message names the field and the value."""


PACKING = ("concat", "best_fit")
ON_ERROR = ("fail", "skip")
# how the loader reads rather than what: set once (the `data` group) for every stage of a run
LOADER_SETTINGS = ("num_workers", "on_error", "max_skip_fraction", "holdout_shards", "read_timeout_s", "read_tries",
                   "read_retry_s", "record")


@dataclass
class SourceConfig:
    name: str = MISSING
    # a prepared directory (local, or on object storage: s3://bucket/prefix), or a manifest.json path
    # or URL (s3://, http(s)://, pipe:)
    path: str = MISSING
    # optional brace pattern for the shards, e.g. "s3://b/code/shard-{000000..000127}.tar"
    urls: Optional[str] = None
    # share of the stage's sequences drawn from this source (normalised over the sources)
    weight: float = 1.0


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    seq_length: int = 4096
    packing: str = "concat"  # concat (pre-training) | best_fit (mid-training: whole documents)
    shuffle_window: int = 256  # stored samples (groups of documents) shuffled together per reader
    pack_window: int = 64  # best_fit: sequences' worth of documents packed together
    seed: int = 1234
    num_workers: int = 2  # dataloader worker processes per data-parallel rank (0: in the main process)
    on_error: str = "fail"  # fail | skip (a bad shard is skipped whole, logged, counted and reported)
    # skip: the run stops when a source's skipped share of the samples a reader has read passes
    # this (judged after 1,000 samples or a whole pass over the reader's shards)
    max_skip_fraction: float = 0.01
    # The last N shards of every source are held out: validation reads them, training never does.
    holdout_shards: int = 0
    # reads from object storage (s3://; data/objstore.py): a transient error (a cut or refused
    # connection, 5xx, throttling, no byte for read_timeout_s) is retried with backoff, resuming at
    # the byte where it stopped, up to read_tries times and read_retry_s seconds of failing per shard;
    # past that the shard goes the on_error way. The defaults ride out a store away for a minute and
    # give up before the watchdog's 120 s floor for a step.
    read_timeout_s: float = 20.0
    read_tries: int = 30
    read_retry_s: float = 100.0
    # record which stored samples each reader delivered, (epoch, source, shard, sample) with every
    # batch (TokenLoader.delivered; glm-pretrain writes them under run.dir/deliveries/): to show
    # that nothing is repeated or lost across restarts and size changes. Off: the loader keeps counts.
    record: bool = False

    def validate(self, where: str = "data") -> "DataConfig":
        if not self.sources:
            raise DataConfigError(f"{where}: data.sources is empty; name at least one prepared dataset")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise DataConfigError(f"{where}: data.sources names repeat: {names}")
        for i, s in enumerate(self.sources):
            if not s.weight > 0:
                raise DataConfigError(f"{where}: data.sources[{i}] ('{s.name}').weight={s.weight} must be positive")
        if self.packing not in PACKING:
            raise DataConfigError(f"{where}: data.packing={self.packing!r} is not one of {PACKING}")
        if self.on_error not in ON_ERROR:
            raise DataConfigError(f"{where}: data.on_error={self.on_error!r} is not one of {ON_ERROR}")
        for name in ("seq_length", "shuffle_window", "pack_window"):
            if getattr(self, name) < 1:
                raise DataConfigError(f"{where}: data.{name}={getattr(self, name)} must be positive")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise DataConfigError(f"{where}: data.max_skip_fraction={self.max_skip_fraction} must lie in [0, 1]")
        if self.holdout_shards < 0:
            raise DataConfigError(f"{where}: data.holdout_shards={self.holdout_shards} must be >= 0")
        if self.num_workers < 0:
            raise DataConfigError(f"{where}: data.num_workers={self.num_workers} must be >= 0")
        for name in ("read_timeout_s", "read_retry_s"):
            if not getattr(self, name) > 0:
                raise DataConfigError(f"{where}: data.{name}={getattr(self, name)} must be positive")
        if self.read_tries < 1:
            raise DataConfigError(f"{where}: data.read_tries={self.read_tries} must be >= 1")
        return self

    def retries(self):
        """How reads from object storage try again (data/objstore.py)."""
        from data.objstore import Retries

        return Retries(timeout_s=self.read_timeout_s, tries=self.read_tries, give_up_s=self.read_retry_s)

    def weights(self) -> list[float]:
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]


def load_data_config(path: str, overrides: list[str] = ()) -> DataConfig:
    """A data config file (e.g. configs/data/smoke.yaml) with `field=value` overrides, validated."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except (OSError, OmegaConfBaseException) as e:
        raise DataConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    return cfg.validate(path)
