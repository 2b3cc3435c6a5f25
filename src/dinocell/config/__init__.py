"""Typed configuration: dataclass defaults -> experiment YAML -> ``key=value`` overrides.

One engine (:mod:`.engine`) for every command's schema: ``pretrain`` (:mod:`.schema`, with the shared
``data`` section of :mod:`.data`), ``segment``, ``extract-volumes`` and ``embed`` all load through
:func:`load`.  Merging is strict: an unknown key fails with its dotted name and the closest valid key.
The resolved tree is written to the run folder as ``config.yaml`` (:mod:`.record`) so every run can be
reproduced from its own folder; command-line glue is in :mod:`.cli`.
"""

from __future__ import annotations

import os
from typing import Any

from dinocell.config.cli import add_config_arguments, allow_intermixed, config_from_args
from dinocell.config.data import (
    ILLUM_MODES,
    SCALING_MODES,
    VIEW_POLICIES,
    DataConfig,
    HoldoutConfig,
    MaskConfig,
    S3Config,
    ScalingConfig,
    StainConfig,
    SyntheticConfig,
    ViewsConfig,
)
from dinocell.config.engine import load, load_yaml, to_dict, validate
from dinocell.config.record import config_record, save_config
from dinocell.config.schema import (
    RETIRED_DATA_KEYS,
    Config,
    HeadConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrackConfig,
    TrainConfig,
)
from dinocell.errors import ConfigError


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, merged strictly."""
    return load(Config, path, overrides)


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Rebuild a Config from a mapping (e.g. a run folder's config.yaml), then overrides; strictly."""
    return load(Config, None, overrides, data=data)


__all__ = [
    "ILLUM_MODES", "RETIRED_DATA_KEYS", "SCALING_MODES", "VIEW_POLICIES",
    "Config", "ConfigError", "DataConfig", "HeadConfig", "HoldoutConfig", "LossConfig", "MaskConfig",
    "ModelConfig", "OptimConfig", "S3Config", "ScalingConfig", "StainConfig", "SyntheticConfig",
    "TrackConfig", "TrainConfig", "ViewsConfig",
    "add_config_arguments", "allow_intermixed", "config_from_args", "config_from_dict",
    "config_record", "load", "load_config", "load_yaml", "save_config", "to_dict", "validate",
]
