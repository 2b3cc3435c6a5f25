"""``dinocell embed``: fields -> per-field and per-well profiles (Parquet), plus model loading.

A profile row is ``Metadata_*`` columns (plate, well, site and whatever the source knows: label,
control flag, load_data metadata) followed by ``emb_0 .. emb_{D-1}``.  The field embedding is built
from the per-channel embeddings of :func:`dinocell.evaluate.consistency.channel_embeddings` (each
stain encoded as its own 1-channel image, as in training):

* ``concat`` (default): the C channel embeddings side by side (C·D features) — keeps what is specific
  to each stain, which profiling needs (a compound may act on mitochondria only);
* ``mean_image``: the embedding of the fluorescent-channel mean image (D);
* ``channel_mean``: the average of the C channel embeddings (D).

Per-well profiles are the mean of the well's field profiles (the usual CellProfiler/JUMP
aggregation).  Files are written to a temporary name and renamed, so a killed job never leaves a
truncated Parquet behind.

Models are given as a run folder (``export/*.safetensors`` if present, else ``checkpoints/last.ckpt``),
a ``.ckpt`` file, or an exported ``.safetensors`` backbone (:func:`load_model`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml

from dinocell.config import Config, config_from_dict, load_config, to_dict
from dinocell.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

VIEWS = ("concat", "mean_image", "channel_mean")
DTYPES = {"fp32": np.float32, "float32": np.float32, "fp16": np.float16, "float16": np.float16}
TEACHER_PREFIX = "meta.teacher.backbone."
HELD_OUT_SEED_OFFSET = 10_007  # same offset as the training summary's held-out synthetic fields


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    """A backbone plus what is known about how it was trained."""

    backbone: Any
    cfg: Config | None
    crop_size: int
    channel_names: list[str]
    description: str
    run_dir: Path | None = None


def _load_ckpt(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"refusing to load {path}: not a plain weights file ({first})") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise UserError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return obj


def _config_for_checkpoint(ckpt: dict[str, Any], path: Path) -> Config:
    """The run's config: ``<run>/config.yaml`` next to ``checkpoints/``, else the copy in the checkpoint."""
    for cand in (path.parent.parent / "config.yaml", path.parent / "config.yaml"):
        if cand.is_file():
            return load_config(cand)
    meta = ckpt.get("dinocell") or {}
    if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return config_from_dict(meta["config"])
    raise UserError(f"no config.yaml found for {path} (expected it in the run folder)")


def load_checkpoint_backbone(path: str | os.PathLike[str]) -> LoadedModel:
    """The EMA teacher backbone of a training checkpoint (``meta.teacher.backbone.*`` keys)."""
    from dinocell.models.backbone import build_backbone

    p = Path(path)
    ckpt = _load_ckpt(p)
    cfg = _config_for_checkpoint(ckpt, p)
    cfg.model.pretrained = None  # the checkpoint holds the weights
    crop = int(cfg.data.views.global_crop_size)
    backbone = build_backbone(cfg.model, img_size=crop)
    state = {k[len(TEACHER_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(TEACHER_PREFIX)}
    if not state:
        raise UserError(f"{p} holds no teacher backbone weights ({TEACHER_PREFIX}*)")
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{p}: weights do not fit the run's model config ({first})") from None
    meta = ckpt.get("dinocell") or {}
    names = list(meta.get("channel_names") or cfg.data.channels or [])
    run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
    return LoadedModel(backbone.eval(), cfg, crop, names, f"checkpoint {p}", run_dir)


def load_export(path: str | os.PathLike[str]) -> LoadedModel:
    """An exported backbone (``.safetensors`` + JSON sidecar)."""
    from dinocell.config import ScalingConfig
    from dinocell.models.backbone import load_backbone

    bb = load_backbone(path)
    side = dict(getattr(bb, "sidecar", {}) or {})
    crop = int((side.get("views") or {}).get("global_crop_size") or bb.arch.get("img_size", 224))
    cfg = Config()
    scaling = side.get("scaling")
    if isinstance(scaling, dict):
        fields = {f.name for f in dataclasses.fields(ScalingConfig)}
        cfg.data.scaling = ScalingConfig(**{k: v for k, v in scaling.items() if k in fields})
    cfg.data.views.global_crop_size = crop
    run_dir = Path(path).parent.parent if Path(path).parent.name == "export" else None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        cfg = load_config(run_dir / "config.yaml")
        cfg.model.pretrained = None
    return LoadedModel(bb, cfg, crop, list(side.get("channel_names") or []), f"export {path}", run_dir)


def load_model(spec: str | os.PathLike[str]) -> LoadedModel:
    """A run folder (newest ``export/*.safetensors``, else ``checkpoints/last.ckpt``), a ``.ckpt`` or an
    exported ``.safetensors``."""
    p = Path(spec)
    if p.is_dir():
        exports = sorted((p / "export").glob("*.safetensors"), key=lambda q: q.stat().st_mtime)
        if exports:
            return load_export(exports[-1])
        last = p / "checkpoints" / "last.ckpt"
        if last.is_file():
            return load_checkpoint_backbone(last)
        raise UserError(f"{p} has neither export/*.safetensors nor checkpoints/last.ckpt")
    if not p.exists():
        raise UserError(f"model not found: {p}")
    if p.suffix == ".safetensors":
        return load_export(p)
    if p.suffix == ".ckpt":
        return load_checkpoint_backbone(p)
    raise UserError(f"cannot tell what {p} is: give a run folder, a .ckpt or a .safetensors file")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def data_config(model: LoadedModel | None, source: str | None, overrides: Sequence[str] = (),
                base: Config | None = None) -> Config:
    """The data config for evaluation: the run's (channels, scaling) with ``source`` and overrides.

    ``synthetic`` with a training config uses *held-out* fields (the training seed + 10007), so a
    model is never scored on the fields it was trained on.
    """
    cfg = base or (model.cfg if model is not None and model.cfg is not None else Config())
    data = to_dict(cfg)
    if source is not None:
        data["data"]["source"] = str(source)
    if data["data"]["source"] == "synthetic" and model is not None and model.cfg is not None:
        data["data"]["synthetic"]["seed"] = model.cfg.data.synthetic.seed + HELD_OUT_SEED_OFFSET
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # unknown sections are rejected by config_from_dict below
            node = node[part]
        node[parts[-1]] = value
    return config_from_dict(data)  # strict: unknown keys fail with a suggestion


def spread_indices(n_total: int, limit: int | None) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(n_total)`` (all when ``limit`` is None)."""
    if limit is None or limit >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, max(1, limit)).round().astype(int))


def load_fields(source: Any, records: Sequence[Any], size: int | None) -> tuple[torch.Tensor, list[Any], list[str]]:
    """Load and scale fields, resized to ``size`` (antialiased); bad fields are skipped and reported."""
    out, kept, skipped = [], [], []
    for rec in records:
        try:
            x = torch.from_numpy(np.ascontiguousarray(source.load(rec))).float()
        except DataError as e:
            skipped.append(f"{rec.key}: {e}")
            log.warning("skipping field %s: %s", rec.key, e)
            continue
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(x)
        kept.append(rec)
    if not out:
        return torch.zeros(0), kept, skipped
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise DataError(f"fields have different shapes {sorted(shapes)}; pass --size to resize them")
    return torch.stack(out), kept, skipped


def record_metadata(rec: Any) -> dict[str, str]:
    """``Metadata_*`` of a field record (plate, well and site always present), as strings."""
    meta = {k: str(v) for k, v in rec.metadata.items() if str(k).startswith("Metadata_")}
    meta.setdefault("Metadata_Plate", str(rec.plate))
    meta.setdefault("Metadata_Well", str(rec.well))
    meta.setdefault("Metadata_Site", str(rec.site))
    return meta


# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------


def field_vectors(emb: torch.Tensor, view: str) -> np.ndarray:
    """(F, C+1, D) channel embeddings -> (F, K) field profiles for ``view`` (see module doc)."""
    if view not in VIEWS:
        raise UserError(f"unknown view '{view}'; choose one of {', '.join(VIEWS)}")
    e = emb.float()
    if view == "concat":
        return e[:, :-1].reshape(e.shape[0], -1).numpy()
    if view == "mean_image":
        return e[:, -1].numpy()
    return e[:, :-1].mean(1).numpy()


def embed_source(
    backbone: Any,
    source: Any,
    size: int | None,
    view: str = "concat",
    batch_size: int = 32,
    limit: int | None = None,
    chunk_fields: int = 64,
    progress: bool = False,
) -> tuple[pd.DataFrame, list[str]]:
    """Per-field profiles of a :class:`~dinocell.data.sources.FieldSource`; returns (table, skipped)."""
    from dinocell.evaluate.consistency import channel_embeddings

    if view not in VIEWS:
        raise UserError(f"unknown view '{view}'; choose one of {', '.join(VIEWS)}")
    idx = spread_indices(len(source.records), limit)
    metas: list[dict[str, str]] = []
    vecs: list[np.ndarray] = []
    skipped: list[str] = []
    chunks = range(0, len(idx), chunk_fields)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="embedding", unit="chunk")
    for start in chunks:
        recs = [source.records[int(i)] for i in idx[start:start + chunk_fields]]
        fields, kept, bad = load_fields(source, recs, size)
        skipped += bad
        if not kept:
            continue
        emb = channel_embeddings(backbone, fields, source.fluorescent, crop_size=size, batch_size=batch_size)
        vecs.append(field_vectors(emb, view))
        metas += [record_metadata(r) for r in kept]
    if not vecs:
        raise DataError(f"no field of {getattr(source, 'name', 'the source')} could be loaded")
    return profiles_frame(metas, np.concatenate(vecs)), skipped


def profiles_frame(metas: Sequence[dict[str, Any]], vectors: np.ndarray) -> pd.DataFrame:
    """``Metadata_*`` columns (sorted, plate/well/site first) + ``emb_0..emb_{K-1}``."""
    meta = pd.DataFrame(list(metas))
    first = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site") if c in meta.columns]
    meta = meta[first + sorted(c for c in meta.columns if c not in first)]
    feats = pd.DataFrame(np.asarray(vectors, dtype=np.float32),
                         columns=[f"emb_{i}" for i in range(vectors.shape[1])])
    return pd.concat([meta.reset_index(drop=True), feats], axis=1)


def aggregate_wells(fields: pd.DataFrame) -> pd.DataFrame:
    """Mean profile per (plate, well); metadata constant within a well is kept, ``Metadata_Count`` added."""
    feat_cols = [c for c in fields.columns if c.startswith("emb_")]
    meta_cols = [c for c in fields.columns if c.startswith("Metadata_")]
    keys = [c for c in ("Metadata_Plate", "Metadata_Well") if c in fields.columns]
    if not keys:
        raise DataError("per-well profiles need Metadata_Plate/Metadata_Well columns")
    grouped = fields.groupby(keys, sort=True, dropna=False)
    constant = [c for c in meta_cols if c not in keys and (grouped[c].nunique(dropna=False) <= 1).all()]
    meta = grouped[constant].first() if constant else grouped.size().to_frame().iloc[:, :0]
    meta["Metadata_Count"] = grouped.size()
    feats = grouped[feat_cols].mean()
    out = pd.concat([meta, feats], axis=1).reset_index()
    return out[keys + [c for c in out.columns if c.startswith("Metadata_") and c not in keys] + feat_cols]


def write_profiles(df: pd.DataFrame, path: str | os.PathLike[str], dtype: str = "fp32") -> Path:
    """Write a profile table as Parquet (features in fp16/fp32) atomically."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose fp32 or fp16")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    feat_cols = [c for c in df.columns if c.startswith("emb_")]
    table = df.copy()
    table[feat_cols] = table[feat_cols].astype(DTYPES[dtype])
    tmp = out.with_name(out.name + ".tmp")
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def run_embed(
    model: str | os.PathLike[str] | LoadedModel,
    out_dir: str | os.PathLike[str],
    data: str | None = None,
    overrides: Sequence[str] = (),
    view: str = "concat",
    dtype: str = "fp32",
    size: int | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Embed a data source with a model; write ``fields.parquet`` and ``wells.parquet`` to ``out_dir``."""
    from dinocell.data.sources import open_source

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose fp32 or fp16")
    m = model if isinstance(model, LoadedModel) else load_model(model)
    cfg = data_config(m, data or "synthetic", overrides)
    source = open_source(cfg.data)
    crop = _round_patch(size or m.crop_size, int(m.backbone.patch_size))
    fields, skipped = embed_source(m.backbone, source, crop, view=view, batch_size=batch_size, limit=limit,
                                   progress=progress)
    wells = aggregate_wells(fields)
    out = Path(out_dir)
    paths = {"fields": write_profiles(fields, out / "fields.parquet", dtype),
             "wells": write_profiles(wells, out / "wells.parquet", dtype)}
    return {"fields": len(fields), "wells": len(wells), "features": int(sum(c.startswith("emb_") for c in fields)),
            "skipped": skipped, "paths": {k: str(v) for k, v in paths.items()}, "size": crop, "view": view,
            "model": m.description, "data": cfg.data.source}


def _round_patch(size: int, patch: int) -> int:
    return max(patch, int(round(size / patch)) * patch)


__all__ = [
    "LoadedModel",
    "aggregate_wells",
    "data_config",
    "embed_source",
    "field_vectors",
    "load_checkpoint_backbone",
    "load_export",
    "load_fields",
    "load_model",
    "profiles_frame",
    "run_embed",
    "spread_indices",
    "write_profiles",
]
