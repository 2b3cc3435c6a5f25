"""The ``data`` section: where fields come from and how they become samples.

Shared by every command that reads fields (``pretrain``, ``segment``, ``embed``/``evaluate``, ``data``):
each section validates itself, and :func:`dinocell.config.engine.load` runs those checks for whichever
schema holds the section, so ``data.*`` means and checks the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dinocell.config.engine import check_choice
from dinocell.errors import ConfigError

#: ``data.views.policy`` values (the one list; :mod:`dinocell.data.views` implements them).
VIEW_POLICIES = ("multiview", "single_view", "channel_pairs", "all_channels")
SCALING_MODES = ("field", "plate", "fixed")
ILLUM_MODES = ("auto", "off", "required")


@dataclass
class ScalingConfig:
    """Per-channel intensity scaling, computed once per field (not per crop)."""

    low_percentile: float = 0.1
    high_percentile: float = 99.9
    clahe: bool = False
    clahe_clip: float = 3.0
    clahe_tiles: int = 8
    # field: percentiles of each field (default; hides intensity differences between wells);
    # plate: percentiles from a sample of the plate's fields (dinocell.data.intensity);
    # fixed: the given [low, high] raw levels per channel name
    mode: str = "field"
    fixed: dict[str, list[float]] = field(default_factory=dict)
    plate_sample_fields: int = 16

    def validate(self) -> None:
        check_choice("data.scaling.mode", self.mode, SCALING_MODES)
        for name, rng in self.fixed.items():
            if len(rng) != 2 or not rng[0] < rng[1]:
                raise ConfigError(f"config key 'data.scaling.fixed.{name}' must be [low, high] with low < high")
        if self.mode == "fixed" and not self.fixed:
            raise ConfigError("data.scaling.mode=fixed needs data.scaling.fixed={DNA: [low, high], ...}")
        if self.plate_sample_fields < 1:
            raise ConfigError("config key 'data.scaling.plate_sample_fields' must be >= 1")


@dataclass
class StainConfig:
    """Reinhard stain normalisation for RGB histology (Lab-space mean/std matching)."""

    use_stain_norm: bool = False
    target_means: list[float] = field(default_factory=lambda: [65.22, 28.59, -14.18])
    target_stds: list[float] = field(default_factory=lambda: [15.37, 9.61, 7.95])


@dataclass
class SyntheticConfig:
    """The built-in synthetic Cell Painting generator (the default, offline dataset)."""

    n_fields: int = 256
    size: int = 128
    seed: int = 0
    n_plates: int = 2
    wells_per_plate: int = 8
    sites_per_well: int = 4
    n_classes: int = 4


@dataclass
class ViewsConfig:
    """Multi-view multi-crop augmentation (see ``data/views.py``)."""

    policy: str = "multiview"  # one of VIEW_POLICIES (data/views.py says what each one draws)
    aligned_globals: bool = False  # all global crops share one box and flips (all_channels: always)
    mean_global: bool = False  # channel_pairs: the fluorescent mean as a third global crop
    # all_channels (G globals): per-device batch x 2 / G images, so a step costs about what G=2 costs;
    # steps per epoch stay those of the configured batch (same step count, same compute per run)
    scale_batch_to_crops: bool = False
    global_crop_size: int = 224
    # the frozen Gram teacher's own undistorted crop of each global crop (loss.gram_weight > 0,
    # gram_target=gram_teacher); null: 2 x global_crop_size (dinov3 512 for 256); 0: it reads the student's
    gram_teacher_crop_size: int | None = None
    local_crop_size: int = 96
    n_local_crops: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    local_mean_prob: float = 0.3
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    jitter_prob: float = 0.8
    blur_prob_global1: float = 1.0
    blur_prob_global2: float = 0.1
    blur_prob_local: float = 0.5
    solarize_prob_global2: float = 0.2

    def validate(self) -> None:
        check_choice("data.views.policy", self.policy, VIEW_POLICIES)
        for key, rng in (("data.views.global_scale", self.global_scale), ("data.views.local_scale", self.local_scale)):
            if len(rng) != 2 or not 0 < rng[0] <= rng[1] <= 1:
                raise ConfigError(f"config key '{key}' must be [min, max] with 0<min<=max<=1")

    @property
    def aligned(self) -> bool:
        """Whether all global crops share one box and flips (``all_channels`` always aligns them)."""
        return bool(self.aligned_globals or self.policy == "all_channels")


@dataclass
class MaskConfig:
    """iBOT block masking of global crops."""

    mask_sample_probability: float = 0.5
    min_ratio: float = 0.1
    max_ratio: float = 0.5
    min_num_patches: int = 4
    min_aspect: float = 0.3
    max_aspect: float = 3.3

    def validate(self) -> None:
        if not 0.0 <= self.min_ratio <= self.max_ratio <= 1.0:
            raise ConfigError("config keys 'data.mask.min_ratio'..'data.mask.max_ratio' must satisfy 0<=min<=max<=1")


@dataclass
class S3Config:
    """Streaming from S3 (public bucket: unsigned by default)."""

    endpoint_url: str | None = None
    sign: bool = False
    region: str = "us-east-1"
    max_in_flight: int = 16
    max_attempts: int = 5
    timeout_s: float = 30.0
    cache_bytes: int = 2 * 1024**3
    disk_cache_dir: str | None = None
    disk_cache_bytes: int = 0
    index_cache: str | None = None
    list_workers: int = 32  # plate folders listed concurrently when the index is built
    shuffle_buffer: int = 64
    filters: dict[str, str] = field(default_factory=dict)


@dataclass
class HoldoutConfig:
    """Fields that training never reads: the evaluation set (see ``data/holdout.py``).

    ``fraction`` of the wells of every plate, chosen by a hash of ``PLATE/WELL`` (stable across runs and
    machines), or the explicit ``wells`` list (``PLATE/WELL`` entries; then ``fraction`` is ignored).
    The resolved well list is kept in ``DIR/holdout.txt`` (resumes reuse it) and the counts in the run's
    ``summary.json``: run outputs never go back into the input config.
    """

    fraction: float = 0.1
    wells: list[str] | None = None
    salt: str = "dinocell"

    def validate(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError("config key 'data.holdout.fraction' must be in [0, 1)")


@dataclass
class DataConfig:
    """Where fields come from and how they become multi-view samples."""

    source: str = "synthetic"  # synthetic | a folder | a load_data csv/parquet | s3://bucket/prefix
    pattern: str | None = None
    load_data: str | None = None
    channels: list[str] | None = None
    source_map: str | None = None  # None: not given (resolve the map; assume source_4 with a warning)
    channel_map: dict[int, str] | str | None = None  # explicit {1: Mito, ...}, or a built-in source (source_4)
    illum: str = "auto"  # ILLUM_MODES; auto | off | required: illumination correction from load_data Illum columns
    repeats: int = 1
    num_workers: int = 0
    batch_size: int = 64  # per device (data.views.scale_batch_to_crops: the DataModule derives the loader's)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    stain: StainConfig = field(default_factory=StainConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    s3: S3Config = field(default_factory=S3Config)
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)

    def validate(self) -> None:
        """The shared ``data`` section: the same rules for ``pretrain``, ``segment`` and ``embed``."""
        check_choice("data.illum", self.illum, ILLUM_MODES)
        if self.batch_size < 1:
            raise ConfigError("config key 'data.batch_size' must be >= 1")
        if self.repeats < 1:
            raise ConfigError("config key 'data.repeats' must be >= 1")
