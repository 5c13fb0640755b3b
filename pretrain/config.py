"""Compose the Hydra config tree under configs/ and validate it against the structured schemas.

Each config group is merged into its dataclass schema, so an unknown field or a value of the wrong
type fails with the group's file named; then cross-field checks (parallel layout vs. model) run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import configs  # the config tree: a package, so that an install without -e carries it
from data.config import LOADER_SETTINGS, DataConfig, DataConfigError
from model import pipeline
from model.config import IMPLS, ConfigError, ModelConfig, ParallelConfig
from optim.config import OptimConfig

CONFIG_DIR = Path(configs.__file__).resolve().parent

# group name -> schema; each group's file is configs/<group>/<choice>.yaml
SCHEMAS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "optim": OptimConfig}


@dataclass
class StageConfig:
    """One training stage: what changes when the run's consumed tokens reach it.

    Unset (null) fields keep the value the previous stage (or the model config) had."""
    tokens: float = MISSING  # tokens trained in this stage
    data: str = MISSING  # a member of configs/data
    seq_length: Optional[int] = None  # default: the data member's
    packing: Optional[str] = None  # concat | best_fit; default: the data member's
    rope_theta: Optional[float] = None
    expert_bias_update_rate: Optional[float] = None  # loss-free balance step (0 stops it)
    mtp_loss_weight: Optional[float] = None
    recompute: Optional[str] = None  # none | selective | full
    # Parallel layout fields (model/config.py ParallelConfig) that change from this stage on, e.g.
    # {context: 2} for a long-context stage; unset fields keep the previous stage's layout, the
    # first stage's is the top-level `parallel`. A switch to another layout saves and exits 75; the
    # restart takes the new layout (pretrain/train.py).
    parallel: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    micro_batch_size: int = 1  # sequences per forward/backward on one data-parallel rank
    # Global batch in tokens, ramped linearly from batch_start_tokens over the first
    # batch_ramp_tokens consumed tokens (in tokens, so it stays right when seq_length changes).
    global_batch_tokens: int = 64 * 2**20
    batch_start_tokens: int = 16 * 2**20
    batch_ramp_tokens: float = 500e9
    # The ramp climbs in steps of this many tokens (evenly spaced over batch_ramp_tokens), so the
    # batch is the same at any data-parallel size whose micro-batch x DP sequences divide it: a run
    # that loses nodes mid-ramp goes on with the same batch (pretrain/elastic.py). null: a linear
    # ramp rounded to micro-batch x DP sequences at the run's size, which then cannot change size
    # inside the ramp.
    batch_ramp_increment_tokens: Optional[int] = None
    # Learning rate: linear warm-up from 0 to optim.lr over lr_warmup_tokens, then cosine to lr_min
    # at the end of the last stage.
    lr_warmup_tokens: float = 2e9
    lr_min: float = 2.5e-5
    dtype: str = "auto"  # bf16 | fp32 | auto (bf16 on a GPU that has it, fp32 on CPU)
    # Layer implementation (model/spec.py): te (Transformer Engine), torch (PyTorch's fused
    # attention and grouped expert GEMMs), local (Megatron's unfused modules, the reference), or
    # auto (te on a GPU where it imports, torch otherwise).
    impl: str = "auto"
    seed: int = 1234
    log_every: int = 1  # steps between console lines and TensorBoard points
    eval_every: int = 0  # steps between validations (0: never)
    eval_batches: int = 2  # micro-batches per validation, per data-parallel rank
    save_every: int = 1000  # steps between checkpoints (0: only at the end and on signals)
    keep_last: int = 3  # checkpoints kept (the newest); 0 keeps all
    # Write checkpoints in the background while training goes on: auto (on GPUs), true or false.
    async_save: str = "auto"
    max_steps: int = 0  # stop after this many steps (0: at the end of the last stage)


@dataclass
class RunConfig:
    dir: str = "outputs/runs/default"  # resolved config, TensorBoard events, checkpoints, log
    exit_after_minutes: float = 0.0  # save and exit with EXIT_RESUME after this long (0: never)


@dataclass
class WatchdogConfig:
    """The hang watchdog (pretrain/watchdog.py): per section, a timeout of `factor` x the longest
    duration seen (saved in run.dir/watchdog/timeouts.json), at least `floor_s`; `first_s` for a
    section not seen yet in this launch (start-up, the first step, of a stage too, the first save);
    `<section>_s` fixes one (0: calibrated), from its second occurrence on (start-up: itself)."""
    enabled: bool = True
    factor: float = 4.0
    floor_s: float = 120.0
    first_s: float = 1800.0
    startup_s: float = 0.0
    step_s: float = 0.0
    validation_s: float = 0.0
    checkpoint_s: float = 0.0
    shutdown_s: float = 0.0
    poll_s: float = 2.0  # how often each supervisor looks for another rank's abort (one stat)
    grace_s: float = 20.0  # how long rank 0's supervisor waits for the other ranks' reports
    # a supervisor that stops answering (stopped, or its node gone): each one refreshes its entry
    # under the launch's ranks/ every alive_s and watches the next rank's; one unchanged for silent_s
    # ends the run, naming that rank and its node
    alive_s: float = 5.0
    silent_s: float = 60.0


@dataclass
class SpikeConfig:
    """Loss spikes (pretrain/spikes.py): a step whose loss exceeds `factor` x the median of the last
    `window` steps (counted once `window` steps were seen since the start or the last stage switch)."""
    policy: str = "skip"  # skip | rewind | off
    factor: float = 3.0
    window: int = 100
    max_spikes: int = 5  # this many within `max_spikes_steps` steps stop the run (exit 3)
    max_spikes_steps: int = 1000


@dataclass
class StragglerConfig:
    """A rank whose own work (until it joins the gradient all-reduce) takes `factor` x the median of
    its pipeline stage's ranks for `steps` logged steps in a row is named on the console."""
    factor: float = 1.5
    steps: int = 3


@dataclass
class FaultsConfig:
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    # a checkpoint that cannot be written (ENOSPC, EIO) on any rank: stop (exit 4), or go on
    # training and try again at the next save interval (`continue`); `latest` stays on the last good one
    on_save_error: str = "stop"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    stages: dict = field(default_factory=dict)  # name -> StageConfig, in training order
    stage_data: dict = field(default_factory=dict)  # name -> the stage's DataConfig
    stage_parallel: dict = field(default_factory=dict)  # name -> the stage's ParallelConfig
    experiment: str = ""
    sources: dict = field(default_factory=dict)  # group -> file it came from, for error messages

    def validate(self, world_size: int | None = None) -> "Config":
        self.model.validate(self.sources.get("model", "model"))
        self.check_layouts(world_size)
        try:
            self.data.validate(self.sources.get("data", "data"))
        except DataConfigError as e:
            raise ConfigError(str(e)) from None
        self.optim.validate(self.sources.get("optim", "optim"))
        where = self.sources.get("experiment", "experiment")
        t = self.train
        for name in ("micro_batch_size", "global_batch_tokens", "batch_start_tokens", "log_every", "eval_batches"):
            if getattr(t, name) < 1:
                raise ConfigError(f"{where}: train.{name}={getattr(t, name)} must be positive")
        for name in ("batch_ramp_tokens", "lr_warmup_tokens", "lr_min", "eval_every", "save_every",
                     "keep_last", "max_steps"):
            if getattr(t, name) < 0:
                raise ConfigError(f"{where}: train.{name}={getattr(t, name)} must be >= 0")
        if t.batch_start_tokens > t.global_batch_tokens:
            raise ConfigError(f"{where}: train.batch_start_tokens={t.batch_start_tokens} exceeds "
                              f"train.global_batch_tokens={t.global_batch_tokens}")
        inc = t.batch_ramp_increment_tokens
        if inc is not None and (isinstance(inc, bool) or not isinstance(inc, int) or inc < 1
                                or (t.global_batch_tokens - t.batch_start_tokens) % inc):
            raise ConfigError(f"{where}: train.batch_ramp_increment_tokens={inc!r} must be a positive whole number "
                              f"of tokens dividing train.global_batch_tokens - train.batch_start_tokens = "
                              f"{t.global_batch_tokens - t.batch_start_tokens}")
        if t.lr_min > self.optim.lr:
            raise ConfigError(f"{where}: train.lr_min={t.lr_min} exceeds optim.lr={self.optim.lr}")
        t.async_save = str(t.async_save).lower()  # a YAML or command-line boolean arrives as True/False
        if t.async_save not in ("auto", "true", "false"):
            raise ConfigError(f"{where}: train.async_save={t.async_save!r} must be auto, true or false")
        if t.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"{where}: train.dtype={t.dtype!r} must be auto, bf16 or fp32")
        if t.impl not in ("auto", *IMPLS):
            raise ConfigError(f"{where}: train.impl={t.impl!r} must be auto, {', '.join(IMPLS[:-1])} or {IMPLS[-1]}")
        if t.eval_every and not self.data.holdout_shards:
            raise ConfigError(f"{where}: train.eval_every={t.eval_every} needs held-out data: set "
                              "data.holdout_shards (the last N shards of every source, never trained on)")
        if self.run.exit_after_minutes < 0:
            raise ConfigError(f"{where}: run.exit_after_minutes={self.run.exit_after_minutes} must be >= 0")
        self._validate_faults(where)
        for name, st in self.stages.items():
            if not st.tokens > 0:
                raise ConfigError(f"{where}: stages.{name}.tokens={st.tokens} must be positive")
            if st.recompute not in (None, "none", "selective", "full"):
                raise ConfigError(f"{where}: stages.{name}.recompute={st.recompute!r} must be none, selective or full")
            for f in ("rope_theta", "expert_bias_update_rate", "mtp_loss_weight"):
                v = getattr(st, f)
                if v is not None and v < 0:
                    raise ConfigError(f"{where}: stages.{name}.{f}={v} must be >= 0")
            try:
                self.stage_data[name].validate(f"{where}: stages.{name} (data={st.data})")
            except DataConfigError as e:
                raise ConfigError(str(e)) from None
            cp = self.stage_parallel.get(name, self.parallel).context
            seq = self.stage_data[name].seq_length
            if cp > 1 and seq % (2 * cp):
                raise ConfigError(f"{where}: stages.{name}: seq_length={seq} (data={st.data}) is not divisible by "
                                  f"2 x parallel.context={cp}: each context-parallel rank holds two equal chunks of "
                                  "every sequence")
        return self

    def _validate_faults(self, where: str) -> None:
        f = self.faults
        if f.on_save_error not in ("stop", "continue"):
            raise ConfigError(f"{where}: faults.on_save_error={f.on_save_error!r} must be stop or continue")
        if f.spike.policy not in ("skip", "rewind", "off"):
            raise ConfigError(f"{where}: faults.spike.policy={f.spike.policy!r} must be skip, rewind or off")
        checks = {"spike.factor": (f.spike.factor, 1.0), "spike.window": (f.spike.window, 1),
                  "spike.max_spikes": (f.spike.max_spikes, 1), "spike.max_spikes_steps": (f.spike.max_spikes_steps, 1),
                  "straggler.factor": (f.straggler.factor, 1.0), "straggler.steps": (f.straggler.steps, 1),
                  "watchdog.factor": (f.watchdog.factor, 1.0), "watchdog.poll_s": (f.watchdog.poll_s, 0.1),
                  "watchdog.alive_s": (f.watchdog.alive_s, 0.5)}
        for name in ("floor_s", "first_s", "startup_s", "step_s", "validation_s", "checkpoint_s", "shutdown_s",
                     "grace_s"):
            checks[f"watchdog.{name}"] = (getattr(f.watchdog, name), 0.0)
        for name, (value, low) in checks.items():
            if value < low:
                raise ConfigError(f"{where}: faults.{name}={value} must be >= {low}")
        if f.watchdog.silent_s < 3 * f.watchdog.alive_s:
            raise ConfigError(f"{where}: faults.watchdog.silent_s={f.watchdog.silent_s} must be at least 3 x "
                              f"faults.watchdog.alive_s={f.watchdog.alive_s} (a busy file system delays a refresh)")

    def check_layouts(self, world_size: int | None) -> None:
        """Every stage's layout against `world_size` processes (the part of `validate` that depends on it)."""
        pipeline.check_layout(self.model, self.parallel, world_size, self.sources.get("parallel", "parallel"))
        where = self.sources.get("experiment", "experiment")
        for name, layout in self.stage_parallel.items():
            if layout != self.parallel:
                pipeline.check_layout(self.model, layout, world_size, f"{where}: stages.{name} (its layout)")

    def layout_of(self, stage: str | None) -> ParallelConfig:
        """The parallel layout stage `stage` runs under (the first stage's for None)."""
        if stage is None or stage not in self.stage_parallel:
            return self.stage_parallel.get(next(iter(self.stages), ""), self.parallel)
        return self.stage_parallel[stage]


def to_schema(schema: type, raw: DictConfig | dict, source: str, group: str):
    """Merge raw config values into a dataclass schema; unknown keys and bad types raise ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        msg = str(getattr(e, "msg", None) or e).splitlines()[0]
        raise ConfigError(f"{source}: {group}.{key}: {msg}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{source}: required field(s) not set: {', '.join(f'{group}.{k}' for k in missing)}")
    return OmegaConf.to_object(merged)


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None,
            config_name: str = "config") -> Config:
    """Compose configs/<config_name>.yaml with command-line style overrides and validate it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    config_dir = Path(config_dir or CONFIG_DIR).resolve()
    # train/run/stages fields need not appear in an experiment file to be overridden: "++" adds or
    # overrides; a misspelt field still fails below, against its schema, with the file named.
    overrides = [f"++{o}" if o.split(".", 1)[0] in ("train", "run", "stages", "faults") and "=" in o
                 and not o.startswith(("+", "~")) else o for o in overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    except HydraException as e:
        raise ConfigError(f"{config_dir}: {e}") from None
    finally:
        GlobalHydra.instance().clear()
    choices = cfg.hydra.runtime.choices
    out = Config()
    out.experiment = choices.get("experiment") or ""
    where = str(config_dir / "experiment" / f"{out.experiment}.yaml") if out.experiment else "config"
    out.sources["experiment"] = where
    # groups whose fields the experiment file sets too: a bad value may come from either file
    overridden = set(OmegaConf.load(where).keys()) if out.experiment else set()
    for group, schema in SCHEMAS.items():
        source = str(config_dir / group / f"{choices.get(group)}.yaml") if choices.get(group) else group
        if group in overridden:
            source = f"{where} (over {source})"
        out.sources[group] = source
        setattr(out, group, to_schema(schema, cfg.get(group, {}), source, group))
    out.train = to_schema(TrainConfig, cfg.get("train", {}), where, "train")
    out.run = to_schema(RunConfig, cfg.get("run", {}), where, "run")
    out.faults = to_schema(FaultsConfig, cfg.get("faults", {}), where, "faults")
    layout = out.parallel
    for name, raw in (cfg.get("stages") or {}).items():
        out.stages[name] = stage = to_schema(StageConfig, raw, where, f"stages.{name}")
        out.stage_data[name] = stage_data(stage, out.data, config_dir, where, name)
        if stage.parallel:  # this stage's changes to the previous stage's layout
            layout = to_schema(ParallelConfig, {**dataclasses.asdict(layout), **stage.parallel}, where,
                               f"stages.{name}.parallel")
        out.stage_parallel[name] = layout
    if not out.stages:  # no recipe: one stage on the `data` group, as long as max_steps allows
        out.stages["main"] = StageConfig(tokens=float("inf"), data=choices.get("data") or "")
        out.stage_data["main"] = out.data
        out.stage_parallel["main"] = out.parallel
    return out.validate()


def stage_data(stage: StageConfig, loader: DataConfig, config_dir: Path, where: str, name: str) -> DataConfig:
    """The stage's data: its configs/data member, with the stage's seq_length and packing, and the
    loader settings (data/config.py LOADER_SETTINGS: workers, bad data, hold-out, reads from object
    storage) of the `data` group, which apply to every stage."""
    path = config_dir / "data" / f"{stage.data}.yaml"
    if not path.is_file():
        members = sorted(p.stem for p in (config_dir / "data").glob("*.yaml"))
        raise ConfigError(f"{where}: stages.{name}.data={stage.data!r}: no {path} (members: {', '.join(members)})")
    data = to_schema(DataConfig, OmegaConf.load(path), str(path), "data")
    for field_name in LOADER_SETTINGS:
        setattr(data, field_name, getattr(loader, field_name))
    if stage.seq_length is not None:
        data.seq_length = stage.seq_length
    if stage.packing is not None:
        data.packing = stage.packing
    return data
