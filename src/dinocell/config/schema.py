"""The ``dinocell pretrain`` schema: the tree of typed defaults (DINOv3's where they exist).

Each section checks its own keys in ``validate()``; :class:`Config` checks the rules that span sections.
:func:`dinocell.config.engine.load` merges YAML and ``key=value`` overrides into it and runs the checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from dinocell.config.data import DataConfig
from dinocell.config.engine import check_choice
from dinocell.errors import ConfigError

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed", "32-true")
LOGGERS = ("wandb", "tensorboard", "csv", "none")
#: run outputs older versions wrote into the input config (held-out counts, now in summary.json)
RETIRED_DATA_KEYS = ("data.holdout.n_wells", "data.holdout.n_fields")


@dataclass
class ModelConfig:
    """The DINOv3 ViT backbone from timm."""

    name: str = "vit_small_patch16_dinov3"
    in_chans: int = 1
    patch_size: int = 16
    pretrained: str | None = None  # local official DINOv3 .pth / dinocell export folder (or old .safetensors)
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

    def validate(self) -> None:
        check_choice("loss.gram_target", self.gram_target, ("gram_teacher", "ema"))
        check_choice("loss.dense_cross_mode", self.dense_cross_mode, ("ibot", "cosine"))
        if self.dense_cross_weight < 0:
            raise ConfigError("config key 'loss.dense_cross_weight' must be >= 0 (0 = off)")
        if self.gram_teacher_start < 0 or self.gram_teacher_every < 0:
            raise ConfigError("config keys 'loss.gram_teacher_start' and 'loss.gram_teacher_every' must be >= 0")
        if self.gram_teacher_max_updates is not None and self.gram_teacher_max_updates < 0:
            raise ConfigError("config key 'loss.gram_teacher_max_updates' must be >= 0 or null")


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

    def validate(self) -> None:
        check_choice("optim.scale_lr", self.scale_lr, ("none", "sqrt"))


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

    def validate(self) -> None:
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.strategy", self.strategy, ("auto", "ddp", "fsdp"))
        if self.finite_check_every < 1:
            raise ConfigError("config key 'train.finite_check_every' must be >= 1")
        # keep_last_n=-1 quietly kept one step checkpoint; checkpoint_every_steps=0 became 1 without a word
        if self.keep_last_n < 1:
            raise ConfigError(f"config key 'train.keep_last_n' must be >= 1 (step checkpoints kept besides "
                              f"last.ckpt), got {self.keep_last_n}")
        if self.checkpoint_every_steps < 1:
            raise ConfigError(f"config key 'train.checkpoint_every_steps' must be >= 1, "
                              f"got {self.checkpoint_every_steps}")


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

    def validate(self) -> None:
        check_choice("track.logger", self.logger, LOGGERS)
        if self.reference_every < 0 or self.reference_fields < 0 or not self.reference_max_drop >= 0:
            raise ConfigError("config keys 'track.reference_every', 'track.reference_fields' and "
                              "'track.reference_max_drop' must be >= 0")


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

    #: keys older versions wrote into a run's config.yaml (run outputs, now in summary.json); ignored on load
    retired_keys: ClassVar[tuple[str, ...]] = RETIRED_DATA_KEYS

    def validate(self) -> None:
        """Rules across sections (each section checks its own keys first)."""
        v = self.data.views
        for key, on in (("loss.ibot_cross_channel", self.loss.ibot_cross_channel),
                        ("loss.dense_cross_weight", self.loss.dense_cross_weight > 0)):
            if on and not v.aligned:
                raise ConfigError(f"config key '{key}' needs aligned global crops: set "
                                  "data.views.aligned_globals=true (or data.views.policy=all_channels)")
            if on and v.policy == "single_view":
                raise ConfigError(f"config key '{key}' needs channel views; "
                                  "data.views.policy=single_view has only the mean image")
        if self.train.head_warmup_steps < 0 or self.optim.backbone_warmup_steps < 0:
            raise ConfigError("config keys 'train.head_warmup_steps' and 'optim.backbone_warmup_steps' must be >= 0")
        if self.model.rope_rescale_coords is not None and self.model.rope_rescale_coords < 1:
            raise ConfigError("config key 'model.rope_rescale_coords' must be >= 1 (a factor) or null")
