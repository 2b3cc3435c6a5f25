"""The ``dinocell segment`` configuration tree: defaults -> YAML -> ``key=value``, merged strictly.

It reuses the pretraining sections where they mean the same thing (``data``, ``track``; the backbone
architecture is a :class:`dinocell.config.ModelConfig`) and loads through the one config engine
(:func:`dinocell.config.load`), so a typo fails with the closest valid key exactly as in ``dinocell
pretrain`` and the ``data`` section is validated by the same rules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dinocell.config import RETIRED_DATA_KEYS, DataConfig, ModelConfig, TrackConfig, load
from dinocell.errors import ConfigError


@dataclass
class SegModelConfig:
    """Backbone source and the decoder on top of it."""

    backbone: str | None = None  # export folder | official DINOv3 .pth | pretraining run folder | None
    arch: ModelConfig = field(default_factory=ModelConfig)  # random init / official .pth architecture
    mode: str = "frozen"  # frozen | finetune
    blocks: int = 1  # the last N backbone blocks feed the neck (timm forward_intermediates)
    feature_blocks: list[int] | None = None  # explicit block indices for the neck (e.g. [1, 3]); replaces blocks
    neck_dim: int = 96
    decoder_dim: int = 32  # channels of the last upsampling stage (doubling towards the neck)
    # resize factor before the backbone (outputs at input size); auto: from the training objects' median
    # diameter (segment/scale.py), resolved by 'segment fit' and stored in the run's config (the measured
    # diameter itself is a run output: summary.json object_diameter_px)
    input_scale: float | str = "auto"
    object_patches: float = 2.5  # auto scale: target object diameter in backbone patches
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

    #: keys older versions wrote into a run's config.yaml (run outputs, now in summary.json); ignored on load
    retired_keys: ClassVar[tuple[str, ...]] = (*RETIRED_DATA_KEYS, "model.object_diameter")

    def validate(self) -> None:
        """Rules of the segment sections (``data`` and ``track`` check themselves, as for pretrain)."""
        if self.model.mode not in ("frozen", "finetune"):
            raise ConfigError(f"config key 'model.mode' must be one of frozen, finetune; got '{self.model.mode}'")
        for key, value, low in (("model.blocks", self.model.blocks, 1), ("train.steps", self.train.steps, 1),
                                ("train.batch_size", self.train.batch_size, 1),
                                ("task.crop_size", self.task.crop_size, 8), ("infer.tile", self.infer.tile, 8),
                                ("infer.batch_size", self.infer.batch_size, 1)):
            if value < low:
                raise ConfigError(f"config key '{key}' must be >= {low}, got {value}")
        if not 0.0 <= self.infer.overlap < 1.0:
            raise ConfigError(f"config key 'infer.overlap' must be in [0, 1), got {self.infer.overlap}")
        scale = self.model.input_scale
        if isinstance(scale, str):
            if scale.strip().lower() != "auto":
                raise ConfigError(f"config key 'model.input_scale' must be 'auto' or a number > 0, got '{scale}'")
            self.model.input_scale = "auto"
        elif scale <= 0:
            raise ConfigError(f"config key 'model.input_scale' must be 'auto' or a number > 0, got {scale}")
        if self.model.object_patches <= 0:
            raise ConfigError(f"config key 'model.object_patches' must be > 0, got {self.model.object_patches}")
        if self.model.feature_blocks is not None and not self.model.feature_blocks:
            raise ConfigError("config key 'model.feature_blocks' must list at least one block index (or be null)")


def segment_config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> SegmentConfig:
    """Defaults, then ``data`` (a YAML mapping or a run's config.yaml), then overrides; strict."""
    return load(SegmentConfig, None, overrides, data=data)


def load_segment_config(path: str | os.PathLike[str] | None = None,
                        overrides: list[str] | tuple[str, ...] = ()) -> SegmentConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, merged strictly."""
    return load(SegmentConfig, path, overrides)
