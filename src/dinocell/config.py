"""Typed configuration: dataclass defaults -> experiment YAML -> ``key=value`` overrides.

Merging is strict: an unknown key fails with its dotted name and the closest valid key, because a
typo that silently falls back to a default can waste a 40-hour run.  The resolved tree is written to
the run folder as ``config.yaml`` so every run can be reproduced from its own folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from dinocell.errors import ConfigError
from dinocell.paths import write_text_atomic
from dinocell.runs import RunDir

# --------------------------------------------------------------------------------------------------
# The tree of defaults
# --------------------------------------------------------------------------------------------------


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

    policy: str = "multiview"  # multiview | single_view | channel_pairs | all_channels
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


@dataclass
class MaskConfig:
    """iBOT block masking of global crops."""

    mask_sample_probability: float = 0.5
    min_ratio: float = 0.1
    max_ratio: float = 0.5
    min_num_patches: int = 4
    min_aspect: float = 0.3
    max_aspect: float = 3.3


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
    ``n_wells`` / ``n_fields`` are written by ``pretrain`` into the run's config.yaml (what was held out);
    the resolved well list is kept in ``DIR/holdout.txt``.
    """

    fraction: float = 0.1
    wells: list[str] | None = None
    salt: str = "dinocell"
    n_wells: int | None = None
    n_fields: int | None = None


@dataclass
class DataConfig:
    """Where fields come from and how they become multi-view samples."""

    source: str = "synthetic"  # synthetic | a folder | a load_data csv/parquet | s3://bucket/prefix
    pattern: str | None = None
    load_data: str | None = None
    channels: list[str] | None = None
    source_map: str | None = None  # None: not given (resolve the map; assume source_4 with a warning)
    channel_map: dict[int, str] | str | None = None  # explicit {1: Mito, ...}, or a built-in source (source_4)
    illum: str = "auto"  # auto | off | required: illumination correction from load_data Illum columns
    repeats: int = 1
    num_workers: int = 0
    batch_size: int = 64
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    stain: StainConfig = field(default_factory=StainConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    s3: S3Config = field(default_factory=S3Config)
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)


@dataclass
class ModelConfig:
    """The DINOv3 ViT backbone from timm."""

    name: str = "vit_small_patch16_dinov3"
    in_chans: int = 1
    patch_size: int = 16
    pretrained: str | None = None  # local official DINOv3 .pth / dinocell .safetensors
    embed_dim: int | None = None  # overrides for tiny test/demo models
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.0
    layerscale_init: float | None = None  # None: DINOv3's 1e-5; from-scratch short runs learn faster at ~0.1
    act_checkpointing: bool = False
    # Train-mode RoPE coordinate rescaling by one log-uniform factor in [1/r, r] per forward (student only;
    # eval and the teacher stay deterministic).  2.0: dinov3's pos_embed_rope_rescale_coords of the DINOv3
    # ViT recipes (configs/train/dinov3_vit7b16_pretrain.yaml, dinov3_vitl16_lvd1689m_distilled.yaml); null: off.
    rope_rescale_coords: float | None = 2.0


@dataclass
class HeadConfig:
    """DINO and iBOT projection heads (DINOv3: 3 layers, 2048 hidden, 256 bottleneck)."""

    prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3
    ibot_prototypes: int | None = None  # None: same as prototypes
    ibot_separate_head: bool = True
    norm_last_layer: bool = True  # DINO/DINOv2 weight-normed prototypes; false = DINOv3's plain linear


@dataclass
class LossConfig:
    """Loss weights and temperatures (DINOv3 defaults)."""

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    # iBOT targets from the *other* aligned global crops at the same position (needs aligned globals)
    ibot_cross_channel: bool = False
    # Dense cross-channel distillation (losses/dense_cross.py): every student patch of aligned global
    # crop k learns the teacher's patch of the other crops at the same position; 0 = off
    dense_cross_weight: float = 0.0
    dense_cross_mode: str = "ibot"  # ibot (ibot_head + Sinkhorn, soft CE) | cosine (centred token cosine)
    koleo_weight: float = 0.1
    gram_weight: float = 0.0
    gram_max_tokens: int = 256
    # Gram anchoring target (DINOv3): a frozen snapshot of the EMA teacher backbone, taken at step
    # gram_teacher_start and refreshed every gram_teacher_every steps (0: never); "ema" uses the live teacher.
    gram_target: str = "gram_teacher"  # gram_teacher | ema
    gram_teacher_start: int = 0
    gram_teacher_every: int = 10000
    # Refreshes happen before steps that are absolute multiples of gram_teacher_every, from
    # gram_teacher_first_update on, at most gram_teacher_max_updates times (dinov3 gram.it_first_update,
    # gram.max_updates; null: unlimited).
    gram_teacher_first_update: int = 0
    gram_teacher_max_updates: int | None = None
    # Gram loss-weight schedule (dinov3 gram.loss_weight_schedule): linear gram_weight_start -> gram_weight over
    # gram_weight_warmup_steps, then cosine to gram_weight_end; null start/end: the constant gram_weight.
    gram_weight_start: float | None = None
    gram_weight_end: float | None = None
    gram_weight_warmup_steps: int = 0
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    sinkhorn_iterations: int = 3
    # DINO/iBOT cross-entropy: fused (custom autograd, default) | compiled (torch.compile) | reference
    cross_entropy: str = "fused"


@dataclass
class OptimConfig:
    """AdamW with DINOv3's schedules; lr is per 1024 images when ``scale_lr`` is sqrt."""

    lr: float = 5e-5
    min_lr: float = 1e-6
    scale_lr: str = "none"  # none | sqrt  (sqrt: lr * 4 * sqrt(global_batch / 1024), dinov3's sqrt_wrt_1024)
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    # Two-stage continued pretraining: after train.head_warmup_steps the backbone's lr ramps linearly from 0
    # to its scheduled value over this many steps (0: full lr at once).
    backbone_warmup_steps: int = 0


@dataclass
class TrainConfig:
    """Engine, schedule length, checkpoints and the optional high-resolution stage."""

    epochs: int = 100
    steps_per_epoch: int | None = None  # None: len(dataset) // global batch
    max_steps: int | None = None
    seed: int = 0
    precision: str = "auto"  # auto | 32 | bf16-mixed | 16-mixed
    strategy: str = "auto"  # auto | ddp | fsdp
    devices: str = "auto"
    num_nodes: int = 1
    accelerator: str = "auto"
    compile: bool = False
    finite_check_every: int = 50  # steps between loss finiteness checks (a host sync); also on logged/ckpt steps
    checkpoint_every_steps: int = 500
    keep_last_n: int = 3
    run_high_res_stage: bool = False
    high_res_epochs: int = 0
    high_global_crop_size: int = 512
    high_local_crop_size: int = 112
    eval_fields: int = 64
    progress_bar: bool = True
    # Two-stage continued pretraining: the student backbone is frozen for the first N steps (no gradients, no
    # optimiser update, no weight decay); the heads train and the teacher heads follow by EMA.
    head_warmup_steps: int = 0


@dataclass
class TrackConfig:
    """Experiment tracking (wandb offline by default)."""

    logger: str = "wandb"  # wandb | tensorboard | csv | none
    project: str = "dinocell"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    log_interval: int = 100
    attention_log_interval: int = 1000
    pca_log_interval: int = 5000
    log_model_checkpoints: bool = False
    # forgetting guard (dinocell.track.callbacks.ReferenceCallback): a reference field set scored at step 0,
    # every reference_every steps and at the end -> reference/* metrics, summary.json reference_start/min/end
    reference: str = "heldout"  # heldout (the run's held-out wells) | none | a source URI (folder, s3://, ...)
    reference_every: int = 1000  # steps between scores (0: step 0 and the end only)
    reference_fields: int = 64  # fields of the reference set, spread over it
    reference_max_drop: float = 0.02  # warn once when the score falls this far below its step-0 value


@dataclass
class Config:
    """The whole configuration tree."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    output_dir: str | None = None


# --------------------------------------------------------------------------------------------------
# Strict merging
# --------------------------------------------------------------------------------------------------


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass tree (leaves and sections)."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(_all_keys(t, dotted + "."))
    return keys


def _unknown_key(dotted: str, root: type | None = None) -> ConfigError:
    keys = _all_keys(root or Config)
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.5)
    if not close:  # fall back to matching the last component only
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{dotted}'{hint}")


def _coerce(value: Any, tp: Any, dotted: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; fail with the key's name."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, dotted)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{dotted}' cannot be {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):  # allow "a,b,c" on the command line
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{dotted}' expects a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted}' expects a mapping, got {value!r}")
        kt, vt = args if len(args) == 2 else (str, Any)
        # string-valued maps (data.s3.filters) keep their values as given: a filter may be a list or a number
        return {_coerce(k, kt, f"{dotted}.{k}"): v if vt in (str, Any) else _coerce(v, vt, f"{dotted}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{dotted}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{dotted}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"config key '{dotted}' expects an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{dotted}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{dotted}' expects a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{dotted}' expects a string, got {value!r}")
        if isinstance(value, bool):  # YAML 1.1 reads a bare `off` / `on` as a boolean (data.illum=off)
            return "on" if value else "off"
        return str(value)
    return value


def _merge(obj: Any, data: dict[str, Any], prefix: str = "", root: type | None = None) -> None:
    """Merge a nested mapping into dataclass instance ``obj`` in place, strictly (``root``: the tree
    whose keys an unknown key is compared with; default :class:`Config`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(dotted, root)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value if value is not None else {}, dotted + ".", root)
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return out


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an experiment YAML file into a mapping (one-line errors for missing/invalid files)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, merged strictly."""
    cfg = Config()
    if path is not None:
        _merge(cfg, load_yaml(path))
    for item in overrides:
        key, value = _parse_override(item)
        _merge(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    choices = {
        "data.views.policy": (cfg.data.views.policy, ("multiview", "single_view", "channel_pairs",
                                                      "all_channels")),
        "train.precision": (cfg.train.precision, ("auto", "32", "bf16-mixed", "16-mixed", "32-true")),
        "train.strategy": (cfg.train.strategy, ("auto", "ddp", "fsdp")),
        "track.logger": (cfg.track.logger, ("wandb", "tensorboard", "csv", "none")),
        "optim.scale_lr": (cfg.optim.scale_lr, ("none", "sqrt")),
        "loss.gram_target": (cfg.loss.gram_target, ("gram_teacher", "ema")),
        "loss.dense_cross_mode": (cfg.loss.dense_cross_mode, ("ibot", "cosine")),
        "data.illum": (cfg.data.illum, ("auto", "off", "required")),
        "data.scaling.mode": (cfg.data.scaling.mode, ("field", "plate", "fixed")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got '{value}'")
    v = cfg.data.views
    if cfg.loss.ibot_cross_channel and not (v.aligned_globals or v.policy == "all_channels"):
        raise ConfigError("config key 'loss.ibot_cross_channel' needs aligned global crops: set "
                          "data.views.aligned_globals=true (or data.views.policy=all_channels)")
    if cfg.loss.ibot_cross_channel and v.policy == "single_view":
        raise ConfigError("config key 'loss.ibot_cross_channel' needs channel views; "
                          "data.views.policy=single_view has only the mean image")
    if cfg.loss.dense_cross_weight < 0:
        raise ConfigError("config key 'loss.dense_cross_weight' must be >= 0 (0 = off)")
    if cfg.loss.dense_cross_weight > 0 and not (v.aligned_globals or v.policy == "all_channels"):
        raise ConfigError("config key 'loss.dense_cross_weight' needs aligned global crops: set "
                          "data.views.aligned_globals=true (or data.views.policy=all_channels)")
    if cfg.loss.dense_cross_weight > 0 and v.policy == "single_view":
        raise ConfigError("config key 'loss.dense_cross_weight' needs channel views; "
                          "data.views.policy=single_view has only the mean image")
    m = cfg.data.mask
    if not 0.0 <= m.min_ratio <= m.max_ratio <= 1.0:
        raise ConfigError("config keys 'data.mask.min_ratio'..'data.mask.max_ratio' must satisfy 0<=min<=max<=1")
    for key, rng in (("data.views.global_scale", cfg.data.views.global_scale),
                     ("data.views.local_scale", cfg.data.views.local_scale)):
        if len(rng) != 2 or not 0 < rng[0] <= rng[1] <= 1:
            raise ConfigError(f"config key '{key}' must be [min, max] with 0<min<=max<=1")
    if cfg.data.batch_size < 1:
        raise ConfigError("config key 'data.batch_size' must be >= 1")
    if cfg.data.repeats < 1:
        raise ConfigError("config key 'data.repeats' must be >= 1")
    if not 0.0 <= cfg.data.holdout.fraction < 1.0:
        raise ConfigError("config key 'data.holdout.fraction' must be in [0, 1)")
    if cfg.train.finite_check_every < 1:
        raise ConfigError("config key 'train.finite_check_every' must be >= 1")
    if cfg.loss.gram_teacher_start < 0 or cfg.loss.gram_teacher_every < 0:
        raise ConfigError("config keys 'loss.gram_teacher_start' and 'loss.gram_teacher_every' must be >= 0")
    if cfg.train.head_warmup_steps < 0 or cfg.optim.backbone_warmup_steps < 0:
        raise ConfigError("config keys 'train.head_warmup_steps' and 'optim.backbone_warmup_steps' must be >= 0")
    if cfg.model.rope_rescale_coords is not None and cfg.model.rope_rescale_coords < 1:
        raise ConfigError("config key 'model.rope_rescale_coords' must be >= 1 (a factor) or null")
    if cfg.loss.gram_teacher_max_updates is not None and cfg.loss.gram_teacher_max_updates < 0:
        raise ConfigError("config key 'loss.gram_teacher_max_updates' must be >= 0 or null")
    sc = cfg.data.scaling
    for name, rng in sc.fixed.items():
        if len(rng) != 2 or not rng[0] < rng[1]:
            raise ConfigError(f"config key 'data.scaling.fixed.{name}' must be [low, high] with low < high")
    if sc.mode == "fixed" and not sc.fixed:
        raise ConfigError("data.scaling.mode=fixed needs data.scaling.fixed={DNA: [low, high], ...}")
    if sc.plate_sample_fields < 1:
        raise ConfigError("config key 'data.scaling.plate_sample_fields' must be >= 1")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain Python data (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, run_dir: str | os.PathLike[str], record: dict[str, Any] | None = None) -> Path:
    """Write the resolved config atomically to ``run_dir/config.yaml``.

    ``record`` (the code that made the run, the channel map and its origin) is written as YAML comments
    at the top: a person and ``yaml.safe_load`` both see it, yet the file stays a strict config that
    ``config_from_dict`` reloads without an unknown key."""
    head = "".join(f"# {k}: {json.dumps(v, sort_keys=True)}\n" for k, v in (record or {}).items())
    return write_text_atomic(RunDir(run_dir).config, head + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``record`` comments :func:`save_config` wrote at the top of a run's config.yaml."""
    out: dict[str, Any] = {}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("# ") or ": " not in line:
            break
        key, value = line[2:].split(": ", 1)
        try:
            out[key] = json.loads(value)
        except ValueError:
            break
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from a mapping (e.g. a run folder's config.yaml), strictly."""
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def allow_intermixed(parser: Any) -> Any:
    """Let ``key=value`` overrides come before and after options (``--config x a=b --max-steps 3 c=d``).

    Plain argparse stops filling positionals once an option follows them; intermixed parsing does not.
    The subparser's class is swapped for a subclass, so the top-level parser is unchanged.
    """
    base = type(parser)

    class Intermixed(base):  # type: ignore[misc, valid-type]
        _inside = False

        def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
            if self._inside:  # parse_known_intermixed_args calls parse_known_args itself
                return super().parse_known_args(args, namespace)
            self._inside = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._inside = False

    parser.__class__ = Intermixed
    return parser


def add_config_arguments(parser: Any) -> None:
    """``--config FILE`` and ``key=value`` overrides (anywhere on the line), shared by every subcommand."""
    parser.add_argument("--config", default=None, help="experiment YAML (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr=1e-4 data.channels=[DNA,RNA]")
    allow_intermixed(parser)


def config_from_args(args: Any, extra: list[str] | None = None) -> Config:
    """Build the config from parsed ``--config``/overrides (plus overrides the command adds)."""
    return load_config(args.config, list(args.overrides or []) + list(extra or []))
