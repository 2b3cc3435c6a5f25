"""``dinocell embed`` (alias ``extract-fields``): fields -> per-field and per-well profiles (Parquet).

One 2-D embedder with one policy for each choice:

* **geometry** (:mod:`dinocell.evaluate.tiling`): tiles of the model's training crop over the field
  at native resolution, mean-pooled (default), or the whole field in one pass (``full``).  Fields are
  never resized, so non-square fields are never squashed.
* **channels**: every stain is encoded as its own 1-channel image (as in training).  The field vector
  is ``concat`` (default: the channel embeddings side by side, C·D — keeps what is specific to each
  stain; brightfield channels get their own slot), ``channel_mean`` (mean of the *fluorescent*
  channel embeddings, D) or ``mean_image`` (embedding of the mean of the *fluorescent* channels, D).
  Brightfield never enters a mean.
* **pool**: the normalised CLS token (default) or the mean of the patch tokens.

A profile row is ``Metadata_*`` columns (plate, well, site, ``Metadata_pert_type``,
``Metadata_JCP2022`` when known, then what the source knows: label, control flag, load_data metadata,
and ``Metadata_FieldIndex``; :func:`dinocell.evaluate.profiling.metadata_columns`) followed by the
features ``Cells_dinocell_0 .. Cells_dinocell_{K-1}``, which pycytominer infers as features.  Fields
are embedded in chunks, each written to ``parts/part_NNNNNN.parquet`` atomically; a rerun skips the
parts that exist.  ``fields.parquet`` and ``wells.parquet`` (median per well, ``pycytominer.aggregate``
via :func:`dinocell.evaluate.profiling.aggregate_wells`) are assembled at the end: the input of
``pycytominer.normalize`` and copairs (``dinocell evaluate --profiles``).
With ``patch_maps`` (``full`` geometry) the patch-feature maps go to one zarr array per plate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dinocell.config import Config, config_from_dict, load, to_dict
from dinocell.errors import ConfigError, DataError, UserError
from dinocell.evaluate.heldout import spread_indices
from dinocell.evaluate.profile_table import DTYPES, profiles_frame, write_profiles
from dinocell.evaluate.profiling import aggregate_wells, feature_columns
from dinocell.evaluate.tiling import GEOMETRIES, field_tiles
from dinocell.models.encode import encode_features
from dinocell.models.loading import LoadedModel, load_model
from dinocell.paths import write_atomic, write_text_atomic
from dinocell.provenance import provenance

log = logging.getLogger(__name__)

VIEWS = ("concat", "channel_mean", "mean_image")
POOLS = ("cls", "mean")
HELD_OUT_SEED_OFFSET = 10_007  # synthetic fields of an unseen seed, for models without a run's held-out wells
RUN_FILE = "embed_run.json"


@dataclass
class EmbedOptions:
    """How fields become profiles (saved in ``embed_run.json``; a resumed run must match)."""

    view: str = "concat"  # concat | channel_mean | mean_image
    pool: str = "cls"  # cls | mean
    geometry: str = "tiles"  # tiles | full
    tile: int | None = None  # tile side in px; None: the model's training global crop
    dtype: str = "fp32"  # feature precision on disk
    limit: int | None = None  # at most this many fields, spread over the source
    chunk_size: int = 256  # fields per resumable part file
    batch_size: int = 32  # images per forward pass
    patch_maps: bool = False  # also write patch-feature maps (full geometry)

    def validate(self) -> None:
        for name, value, allowed in (("view", self.view, VIEWS), ("pool", self.pool, POOLS),
                                     ("geometry", self.geometry, GEOMETRIES), ("dtype", self.dtype, DTYPES)):
            if value not in allowed:
                raise UserError(f"unknown {name} '{value}'; choose one of {', '.join(allowed)}")
        if self.chunk_size < 1 or self.batch_size < 1 or (self.tile is not None and self.tile < 1):
            raise ConfigError("--chunk-size, --batch-size and --tile must be >= 1")
        if self.patch_maps and self.geometry != "full":
            raise ConfigError("--patch-maps needs --geometry full (one map per field at native resolution)")


# --------------------------------------------------------------------------------------------------
# Channel policy
# --------------------------------------------------------------------------------------------------


def channel_plan(view: str, fluorescent: Sequence[bool]) -> tuple[list[int], bool]:
    """(channels encoded alone, whether the fluorescent mean image is encoded) for ``view``."""
    fluo = [c for c, f in enumerate(fluorescent) if f]
    if view == "concat":
        return list(range(len(fluorescent))), False
    if not fluo:
        raise DataError(f"view '{view}' averages fluorescent channels, but the source has none")
    return (fluo, False) if view == "channel_mean" else ([], True)


def field_views(field: torch.Tensor, channels: Sequence[int], fluorescent: Sequence[bool],
                mean_image: bool) -> torch.Tensor:
    """(C, H, W) -> (V, 1, H, W): the listed channels alone, then (optionally) the fluorescent mean."""
    views = [field[c] for c in channels]
    if mean_image:
        views.append(field[[c for c, f in enumerate(fluorescent) if f]].mean(0))
    return torch.stack(views)[:, None].float()


def combine_views(per_view: torch.Tensor, view: str) -> torch.Tensor:
    """(V, ...) per-view embeddings or maps -> the field's: concatenated (V·D, ...) or averaged (D, ...)."""
    if view not in VIEWS:
        raise UserError(f"unknown view '{view}'; choose one of {', '.join(VIEWS)}")
    if view == "concat":
        return per_view.reshape(-1, *per_view.shape[2:])
    return per_view.mean(0)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


class _Batcher:
    """Packs the tiles of consecutive same-shaped fields into forward passes of ~``batch_size`` images."""

    def __init__(self, model: Any, opts: EmbedOptions) -> None:
        self.model, self.opts = model, opts
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.done: list[tuple[int, np.ndarray, np.ndarray | None]] = []  # (index, vector, patch map)

    def add(self, index: int, tiles: torch.Tensor) -> None:
        if self.pending and tiles.shape[2:] != self.pending[-1][1].shape[2:]:
            self.flush()
        self.pending.append((index, tiles))
        if sum(t.shape[0] * t.shape[1] for _, t in self.pending) >= self.opts.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        opts = self.opts
        x = torch.cat([t.flatten(0, 1) for _, t in self.pending])
        maps = None
        if opts.patch_maps:
            maps = encode_features(self.model, x, pool="patch", batch_size=opts.batch_size)
            pooled = maps.float().mean((2, 3)) if opts.pool == "mean" else encode_features(
                self.model, x, pool="cls", batch_size=opts.batch_size)
        else:
            pooled = encode_features(self.model, x, pool=opts.pool, batch_size=opts.batch_size)
        start = 0
        for index, t in self.pending:
            v, n = int(t.shape[0]), int(t.shape[0] * t.shape[1])
            per_view = pooled[start:start + n].float().reshape(v, int(t.shape[1]), -1).mean(1)  # tile mean
            field_map = None
            if maps is not None:  # full geometry: one tile per view
                field_map = combine_views(maps[start:start + n].float(), opts.view).numpy()
            self.done.append((index, combine_views(per_view, opts.view).numpy(), field_map))
            start += n
        self.pending.clear()


def record_metadata(rec: Any, index: int | None = None) -> dict[str, Any]:
    """``Metadata_*`` of a field record as strings (plate, well, site always), plus the field index."""
    meta: dict[str, Any] = {k: str(v) for k, v in (rec.metadata or {}).items() if str(k).startswith("Metadata_")}
    meta.setdefault("Metadata_Plate", str(rec.plate))
    meta.setdefault("Metadata_Well", str(rec.well))
    meta.setdefault("Metadata_Site", str(rec.site))
    if index is not None:
        meta["Metadata_FieldIndex"] = int(index)
    return meta


def _embed_chunk(model: LoadedModel, source: Any, records: Sequence[tuple[int, Any]], opts: EmbedOptions,
                 tile: int, writer: Any) -> tuple[pd.DataFrame | None, list[str]]:
    """Profiles of ``(index, record)`` pairs; unreadable fields are skipped and reported."""
    fluorescent = list(getattr(source, "fluorescent", [True] * len(source.channels)))
    channels, mean_image = channel_plan(opts.view, fluorescent)
    patch = int(model.preprocess.patch_size)
    batcher = _Batcher(model.backbone, opts)
    metas: dict[int, dict[str, Any]] = {}
    skipped: list[str] = []
    for i, rec in records:
        try:
            field = torch.from_numpy(np.ascontiguousarray(source.load(rec), dtype=np.float32))
            tiles = field_tiles(field_views(field, channels, fluorescent, mean_image), opts.geometry, tile, patch)
        except (DataError, UserError) as e:
            skipped.append(f"{rec.key}: {e}")
            log.warning("skipping field %s: %s", rec.key, e)
            continue
        metas[i] = record_metadata(rec, i)
        batcher.add(i, tiles)
    batcher.flush()
    futures, rows, vecs = [], [], []
    for i, vec, field_map in batcher.done:
        if writer is not None and field_map is not None:
            metas[i]["Metadata_PatchIndex"] = writer.row(i)
            futures.append(writer.write(i, field_map))
        rows.append(metas[i])
        vecs.append(vec)
    for f in futures:
        f.result()
    return (profiles_frame(rows, np.stack(vecs)) if vecs else None), skipped


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def data_config(model: LoadedModel | None, source: str | None, overrides: Sequence[str] = (),
                base: Config | None = None, unseen_seed: bool = True) -> Config:
    """The data config for embedding/evaluation: the run's (channels) with the model's training
    illumination, scaling and stain settings (:meth:`Preprocess.data_config`), ``source`` and overrides.

    ``synthetic`` with a training config and ``unseen_seed`` uses fields of another generator seed
    (the training seed + 10007), so a model whose run kept no held-out wells is never scored on the
    fields it was trained on.
    """
    cfg = base or (model.cfg if model is not None and model.cfg is not None else Config())
    # what the weights expect, whatever the base config says (overrides win); official or random
    # weights record no training, so only their (default) scaling applies and the data keeps its illum/stain
    if model is not None and model.trained_preprocess:
        cfg = dataclasses.replace(cfg, data=model.preprocess.data_config(cfg.data))
    elif model is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, scaling=model.preprocess.scaling))
    data = to_dict(cfg)
    if source is not None:
        data["data"]["source"] = str(source)
    if unseen_seed and data["data"]["source"] == "synthetic" and model is not None and model.cfg is not None:
        data["data"]["synthetic"]["seed"] = model.cfg.data.synthetic.seed + HELD_OUT_SEED_OFFSET
    return config_from_dict(data, overrides)  # the one engine: strict, unknown keys fail with a suggestion


def eval_source(model: LoadedModel, data: str | None, overrides: Sequence[str] = (),
                base: Config | None = None) -> tuple[Any, str, int | None]:
    """(source, description, held-out field count or None): the fields a model is scored or embedded on.

    Without ``--data`` a model that comes with its run folder is measured on the run's *held-out wells*
    of its own data source (``DIR/holdout.txt``, the wells training never read), never on synthetic
    data in place of the user's plates.  A model with a training config but no run folder uses its
    training source (all fields, with a warning); a bare export falls back to synthetic fields of an
    unseen seed, and says so.  ``--data`` (or an experiment config) always wins: every field of it.
    """
    from dinocell.data.holdout import heldout_source, read_holdout_file
    from dinocell.data.sources import open_source

    run = model.run_dir
    if data is None and base is None and run is not None and read_holdout_file(run) is not None:
        cfg = data_config(model, None, overrides, unseen_seed=False)
        held = heldout_source(run, open_source(cfg.data))
        n = len(held.records)
        return held, f"{cfg.data.source} (held-out wells of {run.name}: {n} fields)", n
    if data is None and base is None and model.cfg is not None and model.cfg.data.source != "synthetic":
        cfg = data_config(model, None, overrides)
        log.warning("%s has no held-out wells on record: embedding every field of its training source %s "
                    "(give --data to choose)", model.description, cfg.data.source)
        return open_source(cfg.data), f"{cfg.data.source} (training source, no held-out record)", None
    cfg = data_config(model, data or (None if base is not None else "synthetic"), overrides, base)
    desc = cfg.data.source
    if cfg.data.source == "synthetic" and data is None:
        desc += f" (unseen generator seed {cfg.data.synthetic.seed}; the model carries no run folder)"
    return open_source(cfg.data), desc, None


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _signature(source: Any, idx: np.ndarray, opts: EmbedOptions, model: LoadedModel, tile: int) -> dict[str, Any]:
    recs = source.records
    return json.loads(json.dumps({
        "n_fields": int(len(idx)), "channels": list(source.channels),
        "first_key": recs[int(idx[0])].key if len(idx) else None,
        "last_key": recs[int(idx[-1])].key if len(idx) else None,
        "options": {k: v for k, v in asdict(opts).items() if k != "batch_size"}, "tile": tile,
        "model": {"description": model.description, "embed_dim": int(getattr(model.backbone, "embed_dim", 0)),
                  "preprocess": model.preprocess.to_dict()},
    }))


def run_embed(
    model: str | os.PathLike[str] | LoadedModel,
    out_dir: str | os.PathLike[str],
    data: str | None = None,
    overrides: Sequence[str] = (),
    *,
    source: Any = None,
    base_config: Config | None = None,
    model_name: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Embed a data source; write ``fields.parquet`` and ``wells.parquet`` to ``out_dir`` (resumable).

    ``options`` are :class:`EmbedOptions` fields.  ``source`` (a FieldSource) replaces ``data`` /
    ``overrides``; ``base_config`` is an experiment config whose data section selects the fields.
    """
    from dinocell.evaluate.patch_maps import PatchMapWriter

    opts = load(EmbedOptions, data=options)  # typed and strict like every config; validate() runs once
    m = model if isinstance(model, LoadedModel) else load_model(model, model_name=model_name, device=device)
    data_desc = getattr(source, "name", "given source")
    heldout = None
    if source is None:
        source, data_desc, heldout = eval_source(m, data, overrides, base_config)
    tile = int(opts.tile or m.crop_size)
    if tile < m.preprocess.patch_size:  # field_tiles would quietly raise it and the report would lie
        raise ConfigError(f"--tile {tile} is below the model's patch size ({m.preprocess.patch_size} px)")
    idx = spread_indices(len(source.records), opts.limit)
    if not len(idx):
        raise DataError("the data source has no fields")
    out = Path(out_dir)
    if overwrite:
        for name in ("parts", "patch_maps", "fields.parquet", "wells.parquet", RUN_FILE):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    signature = _signature(source, idx, opts, m, tile)
    if (out / RUN_FILE).is_file() and json.loads((out / RUN_FILE).read_text()).get("signature") != signature:
        raise ConfigError(f"{out} holds parts of a different embedding (fields, channels, options or model "
                          "differ); use another output folder or --overwrite")
    write_text_atomic(out / RUN_FILE, json.dumps({"signature": signature, "started": time.time()}, indent=2))
    recs = [(int(i), source.records[int(i)]) for i in idx]
    writer = PatchMapWriter(out / "patch_maps", recs) if opts.patch_maps else None

    n_chunks = (len(recs) + opts.chunk_size - 1) // opts.chunk_size
    from tqdm.auto import tqdm

    for k in tqdm(range(n_chunks), desc="embedding", unit="chunk", disable=not progress):
        part = parts / f"part_{k:06d}.parquet"
        if part.is_file():
            continue
        chunk = recs[k * opts.chunk_size:(k + 1) * opts.chunk_size]
        frame, skipped = _embed_chunk(m, source, chunk, opts, tile, writer)
        table = frame if frame is not None else pd.DataFrame({"Metadata_FieldIndex": pd.Series([], dtype="int64")})
        write_text_atomic(parts / f"part_{k:06d}.skipped.json", json.dumps({"skipped": skipped}, indent=2))  # before the part: it marks done
        write_atomic(part, lambda tmp, table=table: table.to_parquet(tmp, index=False))

    frames, skipped_all = [], []
    for k in range(n_chunks):
        skipped_all += json.loads((parts / f"part_{k:06d}.skipped.json").read_text())["skipped"]
        f = pd.read_parquet(parts / f"part_{k:06d}.parquet")
        if len(f):
            frames.append(f)
    if not frames:
        raise DataError(f"no field could be embedded ({len(skipped_all)} skipped: {skipped_all[:3]})")
    fields = pd.concat(frames, ignore_index=True)
    feat = feature_columns(fields)
    fields = fields[[c for c in fields.columns if c not in feat] + feat]
    wells = aggregate_wells(fields)
    paths = {"fields": write_profiles(fields, out / "fields.parquet", opts.dtype),
             "wells": write_profiles(wells, out / "wells.parquet", opts.dtype)}
    info = {"fields": len(fields), "wells": len(wells), "features": len(feat), "skipped": skipped_all,
            "paths": {k: str(v) for k, v in paths.items()}, "tile": tile, "geometry": opts.geometry,
            "view": opts.view, "pool": opts.pool, "dtype": opts.dtype, "model": m.description, "data": str(data_desc),
            "heldout_fields": heldout, **provenance()}
    write_text_atomic(out / RUN_FILE, json.dumps({"signature": signature, "finished": time.time(), **info}, indent=2))
    return info


__all__ = [
    "EmbedOptions",
    "channel_plan",
    "combine_views",
    "data_config",
    "eval_source",
    "field_views",
    "record_metadata",
    "run_embed",
]
