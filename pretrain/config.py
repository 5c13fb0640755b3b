"""Compose the Hydra config tree under configs/ and validate it against the structured schemas.

Each config group is merged into its dataclass schema, so an unknown field or a value of the wrong
type fails with the group's file named; then cross-field checks (parallel layout vs. model) run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from model.config import ConfigError, ModelConfig
from optim.config import OptimConfig
from pretrain.parallel import ParallelConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# group name -> schema; each group's file is configs/<group>/<choice>.yaml
SCHEMAS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "optim": OptimConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sources: dict = field(default_factory=dict)  # group -> file it came from, for error messages

    def validate(self, world_size: int | None = None) -> "Config":
        self.model.validate(self.sources.get("model", "model"))
        self.parallel.validate(self.model, world_size, self.sources.get("parallel", "parallel"))
        self.data.validate(self.sources.get("data", "data"))
        self.optim.validate(self.sources.get("optim", "optim"))
        return self


def to_schema(schema: type, raw: DictConfig | dict, source: str, group: str):
    """Merge raw config values into a dataclass schema; unknown keys and bad types raise ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
        msg = str(getattr(e, "msg", None) or e).splitlines()[0]
        raise ConfigError(f"{source}: {group}.{key}: {msg}") from None
    obj = OmegaConf.to_object(merged)
    missing = [k for k, v in vars(obj).items() if v == "???"]
    if missing:
        raise ConfigError(f"{source}: required field(s) not set: {', '.join(missing)}")
    return obj


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None,
            config_name: str = "config") -> Config:
    """Compose configs/<config_name>.yaml with command-line style overrides and validate it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    config_dir = Path(config_dir or CONFIG_DIR).resolve()
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
    for group, schema in SCHEMAS.items():
        source = str(config_dir / group / f"{choices.get(group)}.yaml") if choices.get(group) else group
        out.sources[group] = source
        setattr(out, group, to_schema(schema, cfg.get(group, {}), source, group))
    return out.validate()
