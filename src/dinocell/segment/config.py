"""The ``dinocell segment`` configuration tree: defaults -> YAML -> ``key=value``, merged strictly.

It reuses the pretraining sections where they mean the same thing (``data``, ``track``; the backbone
architecture is a :class:`dinocell.config.ModelConfig`) and the generic strict-merge helpers of
:mod:`dinocell.config`, so a typo fails with the closest valid key exactly as in ``dinocell pretrain``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dinocell.config import (
    DataConfig,
    ModelConfig,
    TrackConfig,
    _merge,
    _nest,
    _parse_override,
    load_yaml,
)
from dinocell.errors import ConfigError


@dataclass
class SegModelConfig:
    """Backbone source and the decoder on top of it."""

    backbone: str | None = None  # exported .safetensors | official DINOv3 .pth | pretraining run folder | None
    arch: ModelConfig = field(default_factory=ModelConfig)  # random init / official .pth architecture
    mode: str = "frozen"  # frozen | finetune
    blocks: int = 1  # the last N backbone blocks feed the neck (timm forward_intermediates)
    feature_blocks: list[int] | None = None  # explicit block indices for the neck (e.g. [1, 3]); replaces blocks
    neck_dim: int = 96
    decoder_dim: int = 32  # channels of the last upsampling stage (doubling towards the neck)
    # resize factor before the backbone (outputs at input size); auto: from the training objects' median
    # diameter (segment/scale.py), resolved by 'segment fit' and stored in the run's config
    input_scale: float | str = "auto"
    object_patches: float = 2.5  # auto scale: target object diameter in backbone patches
    object_diameter: float | None = None  # measured by 'segment fit' (median equivalent diameter, px)
    flow_head: bool = False  # extra 2-channel head: gradient of the distance map (Cellpose-style flows)


@dataclass
class SegTaskConfig:
    """What to segment, from which channel."""

    objects: str = "nuclei"  # mask class: nuclei | cells | any <objects> with <field>_<objects>_masks.tif
    channel: str = "DNA"  # training input: a channel name or 'mean' (of the fluorescent channels)
    crop_size: int = 64  # training crop in backbone pixels (a field crop of crop_size / input_scale px)
    # drop predicted and true objects touching the image edge at predict / evaluate (CellProfiler's
    # IdentifyPrimaryObjects default); off by default so every object is kept and counted
    drop_border_objects: bool = False


@dataclass
class SegOptimConfig:
    """AdamW with warm-up + cosine; fine-tuning reuses the trainer's layer-wise lr decay."""

    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    backbone_lr_mult: float = 0.1  # fine-tune: backbone lr relative to the decoder
    layerwise_decay: float = 0.75
    patch_embed_lr_mult: float = 0.2
    foreground_weight: float = 1.0
    distance_weight: float = 1.0
    flow_weight: float = 1.0


@dataclass
class SegTrainConfig:
    """Engine and schedule length (same engine and checkpoint format as pretraining)."""

    steps: int = 300
    batch_size: int = 16
    seed: int = 0
    precision: str = "auto"
    devices: str = "auto"
    accelerator: str = "auto"
    checkpoint_every_steps: int = 100
    keep_last_n: int = 2
    progress_bar: bool = True
    log_interval: int = 20


@dataclass
class PostprocessConfig:
    """Distance map -> instances (peaks + watershed, scikit-image)."""

    foreground_threshold: float = 0.5
    peak_threshold: float = 0.3  # minimum normalised distance of a seed
    min_distance: int = 2  # px between seeds
    smooth_sigma: float = 1.0  # Gaussian smoothing of the distance map before peak finding
    min_size: int = 4  # px; smaller objects are dropped


@dataclass
class InferConfig:
    """Sliding-window inference."""

    tile: int = 256  # backbone pixels (a field tile of tile / input_scale px)
    overlap: float = 0.25
    batch_size: int = 8


@dataclass
class SegmentConfig:
    """The whole ``dinocell segment`` tree."""

    data: DataConfig = field(default_factory=DataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    task: SegTaskConfig = field(default_factory=SegTaskConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    track: TrackConfig = field(default_factory=lambda: TrackConfig(logger="csv"))
    output_dir: str | None = None


def validate(cfg: SegmentConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    if cfg.model.mode not in ("frozen", "finetune"):
        raise ConfigError(f"config key 'model.mode' must be one of frozen, finetune; got '{cfg.model.mode}'")
    if cfg.track.logger not in ("wandb", "tensorboard", "csv", "none"):
        raise ConfigError(f"config key 'track.logger' must be one of wandb, tensorboard, csv, none; "
                          f"got '{cfg.track.logger}'")
    for key, value, low in (("model.blocks", cfg.model.blocks, 1), ("train.steps", cfg.train.steps, 1),
                            ("train.batch_size", cfg.train.batch_size, 1), ("task.crop_size", cfg.task.crop_size, 8),
                            ("infer.tile", cfg.infer.tile, 8), ("infer.batch_size", cfg.infer.batch_size, 1)):
        if value < low:
            raise ConfigError(f"config key '{key}' must be >= {low}, got {value}")
    if not 0.0 <= cfg.infer.overlap < 1.0:
        raise ConfigError(f"config key 'infer.overlap' must be in [0, 1), got {cfg.infer.overlap}")
    scale = cfg.model.input_scale
    if isinstance(scale, str):
        if scale.strip().lower() != "auto":
            raise ConfigError(f"config key 'model.input_scale' must be 'auto' or a number > 0, got '{scale}'")
        cfg.model.input_scale = "auto"
    elif scale <= 0:
        raise ConfigError(f"config key 'model.input_scale' must be 'auto' or a number > 0, got {scale}")
    if cfg.model.object_patches <= 0:
        raise ConfigError(f"config key 'model.object_patches' must be > 0, got {cfg.model.object_patches}")
    if cfg.model.feature_blocks is not None and not cfg.model.feature_blocks:
        raise ConfigError("config key 'model.feature_blocks' must list at least one block index (or be null)")


def segment_config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> SegmentConfig:
    """Defaults, then ``data`` (a YAML mapping or a run's config.yaml), then overrides; strict."""
    cfg = SegmentConfig()
    _merge(cfg, data, root=SegmentConfig)
    for item in overrides:
        key, value = _parse_override(item)
        _merge(cfg, _nest(key, value), root=SegmentConfig)
    validate(cfg)
    return cfg


def load_segment_config(path: str | os.PathLike[str] | None = None,
                        overrides: list[str] | tuple[str, ...] = ()) -> SegmentConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, merged strictly."""
    return segment_config_from_dict(load_yaml(path) if path is not None else {}, overrides)

