"""The one model loader: any saved dinocell/DINOv3 backbone -> the model *and* how to feed it.

Accepted, by what the path is:

* a run folder: its newest export under ``export/``, else ``checkpoints/last.ckpt``;
* a training checkpoint ``.ckpt`` (Lightning; the EMA teacher backbone by default);
* a dinocell export: a timm folder (``config.json`` + ``model.safetensors``,
  :mod:`dinocell.models.timm_export`, what ``dinocell export`` writes), or an old ``.safetensors`` +
  JSON sidecar (read only);
* an official DINOv3 ``.pth`` (the architecture comes from the released file name, ``model_name``,
  or ``arch``);
* nothing, with ``arch``: a randomly initialised backbone of that architecture.

Every consumer (``embed``, ``evaluate``, ``segment``, ``extract``) obtains its model here and takes the
:class:`LoadedModel`, never a bare backbone, so the preprocessing always comes with the weights.

Why one loader returning a :class:`Preprocess` too: a backbone trained on percentile-scaled
single-channel 32-px crops gives meaningless features on raw uint16 fields or on 1080-px fields
squashed into one crop.  The scaling, channel layout, patch size and training crop travel with the
weights (sidecar, checkpoint config) and come back with them here.

Checkpoints are read with ``torch.load(weights_only=True)`` through :mod:`dinocell.models.weights`
(nothing in them can run code); exports are safetensors.  Where a run folder keeps its checkpoint,
exports and config is :class:`dinocell.runs.RunDir`'s business, not this module's.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinocell.config import (
    Config,
    DataConfig,
    ModelConfig,
    ScalingConfig,
    StainConfig,
    config_from_dict,
    load_config,
)
from dinocell.errors import DataError, UserError, first_line
from dinocell.models.backbone import (
    DinoBackbone,
    build_backbone,
    load_export_backbone,
)
from dinocell.models.timm_export import is_export_folder
from dinocell.models.weights import load_weights_file
from dinocell.runs import RunDir
from dinocell.scaling import finish_field, fixed_ranges

#: Where a training checkpoint keeps the EMA teacher's backbone (``meta.<which>.backbone.*``).
TEACHER_PREFIX = "meta.teacher.backbone."

#: Official DINOv3 release file stems -> timm architecture (``dinov3_vits16_pretrain_lvd1689m-....pth``).
OFFICIAL_NAMES = {
    "vits16": "vit_small_patch16_dinov3",
    "vits16plus": "vit_small_plus_patch16_dinov3",
    "vitb16": "vit_base_patch16_dinov3",
    "vitl16": "vit_large_patch16_dinov3",
    "vith16plus": "vit_huge_plus_patch16_dinov3",
    "vit7b16": "vit_7b_patch16_dinov3",
}


@dataclass
class Preprocess:
    """How a backbone expects its input; calling it turns a raw (C, H, W) field into model input.

    Everything training applied to a raw field travels here, so inference feeds what training fed:

    * ``illum``: the training ``data.illum`` setting.  Illumination functions belong to a plate, so
      only a data source can apply them: :meth:`data_config` gives every source a consumer opens this
      setting.  A bare array handed to :meth:`scale` is taken as already corrected.
    * ``scaling``: ``data.scaling`` (mode ``field`` / ``plate`` / ``fixed``, its percentiles, fixed
      ranges, CLAHE), computed on the whole field (never per crop), as in training.
    * ``stain``: ``data.stain`` (Reinhard normalisation of RGB sources), applied before scaling.

    :meth:`scale` and ``FieldSource.finish`` call one function, :func:`dinocell.scaling.finish_field`.
    ``in_chans == 1``: every channel is its own image (the way the multi-view pretraining presents
    channels); otherwise the C channels form one image.  ``crop_size``: the training global crop in
    pixels, i.e. the tile size at training magnification.
    """

    in_chans: int = 1
    patch_size: int = 16
    crop_size: int = 224
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    channel_names: list[str] = field(default_factory=list)
    stain: StainConfig = field(default_factory=StainConfig)
    illum: str = "auto"

    def ranges(self, channels: Sequence[str] | None = None) -> list[tuple[float, float]] | None:
        """The raw [low, high] levels of each channel a bare array is scaled with (None: the field's own
        percentiles).  ``plate`` mode needs a plate's statistics, which only a data source has: a
        one-line UserError rather than quietly feeding per-field percentiles."""
        mode = getattr(self.scaling, "mode", "field")
        if mode == "field":
            return None
        if mode == "fixed":
            names = list(channels) if channels is not None else list(self.channel_names)
            if not names:
                raise UserError("the model was trained with data.scaling.mode=fixed: name the field's channels "
                                "(the fixed ranges are per channel name)")
            try:
                return fixed_ranges(self.scaling.fixed, names)
            except DataError as e:
                raise UserError(str(e)) from None
        if mode == "plate":
            raise UserError("the model was trained with data.scaling.mode=plate: a bare image has no plate "
                            "statistics; read the fields through a data source (--data) or pass ranges=")
        raise UserError(f"data.scaling.mode must be field, plate or fixed; got '{mode}'")

    def scale(self, raw: np.ndarray, channels: Sequence[str] | None = None,
              ranges: Sequence[tuple[float, float]] | None = None) -> np.ndarray:
        """(C, H, W) raw (illumination-corrected) intensities -> float32 in [0, 1]: stain
        normalisation and scaling by the training mode, the data sources' own function
        (:func:`dinocell.scaling.finish_field`), so a model sees what it was trained on.

        ``channels``: the field's channel names (``fixed`` ranges are per name; default
        ``channel_names``); ``ranges``: explicit raw levels (e.g. a plate's statistics)."""
        arr = np.asarray(raw)
        if arr.ndim != 3:
            raise UserError(f"expected a (C, H, W) field, got shape {arr.shape}")
        rng = list(ranges) if ranges is not None else self.ranges(channels)
        return finish_field(arr, self.scaling, self.stain, "field", rng)

    def scale_volume(self, vol: np.ndarray, channel: str | None = None) -> np.ndarray:
        """A single-channel (D, H, W) volume crop -> float32 [0, 1] by the same rule, the whole crop being
        one field of one channel (one set of levels for every slice, whichever axis it is sliced along).

        ``fixed`` ranges are raw levels of a named channel: they apply only when ``channel`` names one
        (a volume crop of unnamed EM intensities is refused with one line, as ``plate`` scaling is)."""
        arr = np.asarray(vol)
        if arr.ndim != 3:
            raise UserError(f"expected a (D, H, W) volume, got shape {arr.shape}")
        if channel is None and getattr(self.scaling, "mode", "field") != "field":
            raise UserError(f"the model was trained with data.scaling.mode={self.scaling.mode}: its levels "
                            "belong to named fluorescence channels, not to a volume crop")
        channel = channel or "raw"
        d, h, w = arr.shape
        return self.scale(arr.reshape(1, d * h, w), [channel]).reshape(d, h, w)

    def __call__(self, raw: np.ndarray | torch.Tensor, scaled: bool = False,
                 channels: Sequence[str] | None = None) -> torch.Tensor:
        """Raw (C, H, W) field -> (C, 1, H', W') (``in_chans == 1``) or (1, C, H', W') float32 images.

        ``H'``, ``W'`` are ``H``, ``W`` centre-cropped down to multiples of the patch size (fewer than
        one patch is lost per side; nothing is resized).  ``scaled=True`` skips :meth:`scale`
        (fields from a data source opened with :meth:`data_config` are finished already).
        """
        arr = raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
        x = np.asarray(arr, np.float32) if scaled else self.scale(arr, channels)
        c = x.shape[0]
        x = crop_to_patches(torch.from_numpy(np.ascontiguousarray(x)), self.patch_size)
        if self.in_chans == 1:
            return x[:, None]
        if c != self.in_chans:
            raise UserError(f"model expects {self.in_chans} input channels, the field has {c}")
        return x[None]

    def data_config(self, data: DataConfig) -> DataConfig:
        """``data`` with this model's training illumination, scaling and stain settings: what every
        data source a consumer opens for this model must be configured with."""
        return dataclasses.replace(data, illum=self.illum, scaling=copy.deepcopy(self.scaling),
                                   stain=copy.deepcopy(self.stain))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the export's ``pretrained_cfg`` notes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict`; older sidecars (no ``stain`` / ``illum`` / ``mode``) read as the
        defaults they were trained with."""
        def pick(kind: Any, values: Any) -> Any:
            known = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in (values or {}).items() if k in known})

        return cls(in_chans=int(d.get("in_chans", 1)), patch_size=int(d.get("patch_size", 16)),
                   crop_size=int(d.get("crop_size", 224)), scaling=pick(ScalingConfig, d.get("scaling")),
                   channel_names=[str(c) for c in d.get("channel_names") or []],
                   stain=pick(StainConfig, d.get("stain")), illum=str(d.get("illum") or "auto"))


def crop_to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Centre-crop the last two axes down to multiples of ``patch`` (no resizing)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    nh, nw = h // patch * patch, w // patch * patch
    if nh == 0 or nw == 0:
        raise UserError(f"image of {h}x{w} pixels is smaller than the patch size {patch}")
    top, left = (h - nh) // 2, (w - nw) // 2
    return x[..., top:top + nh, left:left + nw]


@dataclass
class LoadedModel:
    """A backbone in eval mode, its preprocessing, and what is known about how it was trained."""

    backbone: DinoBackbone
    preprocess: Preprocess
    cfg: Config | None = None  # the training config when known (run folder, checkpoint)
    description: str = ""
    run_dir: Path | None = None
    #: checkpoint | export | official | random | given (built by the caller): whether
    #: ``preprocess`` is what the weights were trained with, or a default (official release, random weights)
    kind: str = "given"

    @property
    def trained_preprocess(self) -> bool:
        """True when ``preprocess`` records how the weights were trained (so data sources must follow it)."""
        return self.kind not in ("official", "random")

    @property
    def crop_size(self) -> int:
        return self.preprocess.crop_size

    @property
    def channel_names(self) -> list[str]:
        return self.preprocess.channel_names


def preprocess_from_config(cfg: Config, channel_names: list[str] | None = None) -> Preprocess:
    """The preprocessing a training config implies."""
    return Preprocess(in_chans=int(cfg.model.in_chans), patch_size=int(cfg.model.patch_size),
                      crop_size=int(cfg.data.views.global_crop_size),
                      scaling=copy.deepcopy(cfg.data.scaling),
                      channel_names=list(channel_names if channel_names is not None else cfg.data.channels or []),
                      stain=copy.deepcopy(cfg.data.stain), illum=str(cfg.data.illum))


# --------------------------------------------------------------------------------------------------
# The kinds of saved models
# --------------------------------------------------------------------------------------------------


def _run_config(ckpt: dict[str, Any], path: Path) -> Config:
    """The config the weights were trained with: the checkpoint's copy, else ``<run>/config.yaml``."""
    meta = ckpt.get("dinocell") or {}
    if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return config_from_dict(meta["config"])
    for cand in (RunDir(path.parent.parent).config, RunDir(path.parent).config):
        if cand.is_file():
            return load_config(cand)
    raise UserError(f"no config for {path}: neither in the checkpoint nor as config.yaml in the run folder")


def load_checkpoint_model(path: str | os.PathLike[str], which: str = "teacher") -> LoadedModel:
    """The ``which`` (teacher/student) backbone of a dinocell training checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    ckpt = load_weights_file(p)
    if not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{p} is not a Lightning checkpoint (no state_dict)")
    cfg = _run_config(ckpt, p)
    cfg.model.pretrained = None  # the checkpoint holds the weights
    backbone = build_backbone(cfg.model, img_size=cfg.data.views.global_crop_size)
    prefix = TEACHER_PREFIX.replace("teacher", which)
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise UserError(f"{p} holds no {which} backbone weights ({prefix}*)")
    backbone.load_checked(state, str(p))
    meta = ckpt.get("dinocell") or {}
    pre = preprocess_from_config(cfg, list(meta.get("channel_names") or cfg.data.channels or []))
    run = RunDir.of_file(p)
    return LoadedModel(backbone.eval(), pre, cfg, f"checkpoint {p}", run.root if run else None, kind="checkpoint")


def _export_preprocess(side: dict[str, Any], bb: DinoBackbone) -> Preprocess:
    """From the sidecar's ``preprocess`` entry, or the older ``scaling``/``views``/``channel_names`` keys."""
    if isinstance(side.get("preprocess"), dict):
        return Preprocess.from_dict(side["preprocess"])
    crop = (side.get("views") or {}).get("global_crop_size") or bb.arch.get("img_size", 224)
    return Preprocess.from_dict({"in_chans": bb.in_chans, "patch_size": bb.patch_size, "crop_size": crop,
                                 "scaling": side.get("scaling"), "channel_names": side.get("channel_names")})


def _with_run(pre: Preprocess, written: dict[str, Any], path: Path) -> tuple[Config | None, Path | None]:
    """The run's config and folder when the export sits in ``<run>/export``; an export written before the
    ``stain`` / ``illum`` entries takes them from that config."""
    run = RunDir.of_file(path)
    if run is None:
        return None, None
    cfg = None
    if run.config.is_file():
        cfg = load_config(run.config)
        cfg.model.pretrained = None
        if "stain" not in written:
            pre.stain = copy.deepcopy(cfg.data.stain)
        if "illum" not in written:
            pre.illum = str(cfg.data.illum)
    return cfg, run.root


def load_export_model(path: str | os.PathLike[str]) -> LoadedModel:
    """An old dinocell export (``.safetensors`` + JSON sidecar; read only); the run's config too when it
    sits in ``<run>/export``."""
    bb = load_export_backbone(path)
    side = dict(bb.sidecar or {})
    pre = _export_preprocess(side, bb)
    p = Path(path)
    written = side.get("preprocess") if isinstance(side.get("preprocess"), dict) else {}
    cfg, run_dir = _with_run(pre, written, p)
    return LoadedModel(bb, pre, cfg, f"export {p}", run_dir, kind="export")


def load_timm_folder(path: str | os.PathLike[str]) -> LoadedModel:
    """An export folder (``dinocell export``), rebuilt by timm's own ``local-dir:`` loader, plus the mask
    token and RoPE periods of ``dinocell.safetensors``; the run's config too when it sits in ``<run>/export``."""
    import timm

    from dinocell.models.timm_export import CONFIG, load_into, read_config, read_extra, read_preprocess_note

    p = Path(path)
    conf = read_config(p)
    name, args = str(conf["architecture"]), dict(conf.get("model_args") or {})
    pre_d = read_preprocess_note(conf.get("pretrained_cfg") or {})
    if pre_d is None:
        raise UserError(f"{p / CONFIG} carries no dinocell preprocessing (not written by dinocell export)")
    try:
        model = timm.create_model(f"local-dir:{p}", pretrained=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise UserError(f"timm cannot load {p}: {first_line(e)}") from None
    img = args.get("img_size", 224)
    arch = {"timm_name": name, "in_chans": int(model.patch_embed.proj.in_channels),
            "patch_size": int(model.patch_embed.patch_size[0]), "embed_dim": int(model.embed_dim),
            "depth": len(model.blocks), "num_heads": int(model.blocks[0].attn.num_heads),
            "img_size": int(img[0] if isinstance(img, (list, tuple)) else img)}
    bb = DinoBackbone(model, name, arch)
    # timm loaded the weights; the mask token and RoPE periods it does not know come from dinocell.safetensors
    # (a folder without it: zero mask token, timm's periods)
    load_into(bb, dict(model.state_dict()), read_extra(p), str(p))
    pre = Preprocess.from_dict(pre_d)
    cfg, run_dir = _with_run(pre, pre_d, p)
    return LoadedModel(bb.eval(), pre, cfg, f"export {p}", run_dir, kind="export")


def official_model_name(path: str | os.PathLike[str]) -> str | None:
    """timm architecture of an official DINOv3 release file, from its name (None if not recognised)."""
    m = re.match(r"dinov3_(vit[a-z0-9]+?)_", Path(path).name)
    return OFFICIAL_NAMES.get(m.group(1)) if m else None


def load_official_model(path: str | os.PathLike[str], model_name: str | None = None,
                        patch_size: int = 16, arch: ModelConfig | None = None, img_size: int = 224) -> LoadedModel:
    """An official DINOv3 ``.pth`` as a 1-channel backbone (RGB filters summed; patch resampled if asked).

    ``arch``: the architecture to load the weights into (e.g. a patch-8 segmenter backbone; its name,
    sizes and patch size win); else the release's own, named by ``model_name`` or the file name."""
    if arch is not None:
        cfg = dataclasses.replace(arch, pretrained=str(path))
    else:
        name = model_name or official_model_name(path)
        if name is None:
            raise UserError(f"cannot tell the architecture of {Path(path).name}: pass model_name "
                            "(e.g. vit_small_patch16_dinov3)")
        cfg = ModelConfig(name=name, in_chans=1, patch_size=patch_size, pretrained=str(path))
    bb = build_backbone(cfg, img_size=img_size)
    pre = Preprocess(in_chans=int(cfg.in_chans), patch_size=int(cfg.patch_size), crop_size=224)
    return LoadedModel(bb.eval(), pre, None, f"official {path}", None, kind="official")


def arch_config(arch: ModelConfig | Mapping[str, Any]) -> tuple[ModelConfig, int]:
    """(ModelConfig, img_size) of a config or of the architecture dict a backbone records (``DinoBackbone.arch``)."""
    if isinstance(arch, ModelConfig):
        return dataclasses.replace(arch, pretrained=None), 224
    try:
        cfg = ModelConfig(name=str(arch["timm_name"]), in_chans=int(arch["in_chans"]),
                          patch_size=int(arch["patch_size"]), embed_dim=int(arch["embed_dim"]),
                          depth=int(arch["depth"]), num_heads=int(arch["num_heads"]))
    except KeyError as e:
        raise UserError(f"recorded backbone architecture lacks {e}") from None
    return cfg, int(arch.get("img_size", 224))


def init_model(arch: ModelConfig | Mapping[str, Any], img_size: int | None = None) -> LoadedModel:
    """A randomly initialised backbone of ``arch`` (a segmenter trained from scratch, a checkpoint's
    recorded architecture before its weights are loaded, extraction without weights)."""
    cfg, recorded = arch_config(arch)
    bb = build_backbone(cfg, img_size=int(img_size or recorded))
    pre = Preprocess(in_chans=int(cfg.in_chans), patch_size=int(cfg.patch_size), crop_size=int(img_size or recorded))
    return LoadedModel(bb.eval(), pre, None, f"random init {cfg.name}", None, kind="random")


def load_model(path: str | os.PathLike[str] | None, model_name: str | None = None, which: str = "teacher",
               device: str | torch.device | None = None, *, arch: ModelConfig | Mapping[str, Any] | None = None,
               img_size: int | None = None) -> LoadedModel:
    """The one door: any saved backbone (see the module doc) in eval mode, with its :class:`Preprocess`.

    ``model_name``: timm architecture for an official ``.pth`` whose file name does not say it.
    ``which``: ``teacher`` (default, the EMA network that gets exported) or ``student`` for checkpoints.
    ``arch``: the architecture for a file that carries none (an official ``.pth`` is loaded into it,
    e.g. with patch 8), or, with no ``path``, a randomly initialised backbone of it (``img_size``).
    """
    if path is None or str(path) == "":
        if arch is None:
            raise UserError("no model given: pass a path or an architecture")
        m = init_model(arch, img_size)
        if device is not None:
            m.backbone.to(device)
        return m
    p = Path(path)
    if p.is_dir():
        if is_export_folder(p):
            m = load_timm_folder(p)
        else:
            run = RunDir(p)
            exports = run.exports()
            if exports and which == "teacher":
                m = load_timm_folder(exports[-1]) if exports[-1].is_dir() else load_export_model(exports[-1])
            elif run.last_checkpoint.is_file():
                m = load_checkpoint_model(run.last_checkpoint, which)
            else:
                raise UserError(f"{p} has neither an export in {run.export_dir.name}/ nor "
                                f"{run.last_checkpoint.relative_to(p)}")
    elif not p.exists():
        raise UserError(f"model not found: {p}")
    elif p.suffix == ".safetensors":
        m = load_export_model(p)
    elif p.suffix == ".ckpt":
        m = load_checkpoint_model(p, which)
    elif p.suffix in (".pth", ".pt"):
        official_arch = arch_config(arch)[0] if arch is not None else None
        m = load_official_model(p, model_name, arch=official_arch, img_size=int(img_size or 224))
    else:
        raise UserError(f"cannot tell what {p} is: give a run folder, a .ckpt, an export folder (or an old "
                        ".safetensors export) or an official DINOv3 .pth")
    if device is not None:
        m.backbone.to(device)
    return m


__all__ = [
    "LoadedModel",
    "arch_config",
    "init_model",
    "Preprocess",
    "TEACHER_PREFIX",
    "crop_to_patches",
    "load_checkpoint_model",
    "load_export_model",
    "load_model",
    "load_official_model",
    "load_timm_folder",
    "official_model_name",
    "preprocess_from_config",
]
