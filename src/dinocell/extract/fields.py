"""``dinocell extract-fields``: per-field embeddings of 2-D Cell Painting fields, resumable.

Each channel of a field is encoded on its own as a 1-channel image (the way the multi-view
pretraining presents channels), plus the mean of the fluorescent channels; the per-view vectors are
combined by mean (channel-invariant, D values) or concatenation (V*D values).  Fields are processed
in chunks: each chunk becomes ``parts/part_NNNNNN.parquet`` written atomically, a rerun skips the
parts that exist, and the final ``embeddings.parquet`` (``Metadata_*`` columns + ``emb_0..``) is
assembled from the parts.  Optional patch-feature maps go to one TensorStore zarr per plate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.errors import ConfigError, DataError
from dinocell.extract.volumes import ModelSpec, array_spec, load_model, write_json_atomic

POOLS = ("cls", "mean")
COMBINES = ("mean", "concat")
RUN_FILE = "fields_run.json"


@dataclass
class FieldExtractionOptions:
    """How fields become embeddings (saved to ``fields_run.json``; a rerun must match it)."""

    pool: str = "cls"  # cls | mean (mean of normalised patch tokens)
    combine: str = "mean"  # mean | concat over the views (channels + mean image)
    include_mean_image: bool = True
    chunk_size: int = 256  # fields per part file
    batch_size: int = 64  # images per forward pass
    patch_maps: bool = False
    resize: int | None = None  # resize fields to this square size before encoding
    compression: str = "zstd"  # for patch maps

    def validate(self) -> None:
        if self.pool not in POOLS:
            raise ConfigError(f"--pool must be one of {', '.join(POOLS)}; got '{self.pool}'")
        if self.combine not in COMBINES:
            raise ConfigError(f"--combine must be one of {', '.join(COMBINES)}; got '{self.combine}'")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise ConfigError("--chunk-size and --batch-size must be >= 1")
        if self.resize is not None and self.resize < 1:
            raise ConfigError("--resize must be >= 1")


def field_views(img: np.ndarray, fluorescent: Sequence[bool], include_mean: bool = True) -> np.ndarray:
    """(C, H, W) -> (V, 1, H, W): each channel alone, then the mean of the fluorescent channels."""
    views = [img[c] for c in range(img.shape[0])]
    if include_mean:
        fl = [c for c, f in enumerate(fluorescent) if f] or list(range(img.shape[0]))
        views.append(img[fl].mean(0))
    return np.stack(views)[:, None].astype(np.float32, copy=False)


def _fit(img: np.ndarray, patch: int, resize: int | None) -> np.ndarray:
    """Resize (if asked), then centre-crop each side down to a multiple of the patch size."""
    if resize is not None:
        import torch
        import torch.nn.functional as F

        img = F.interpolate(torch.from_numpy(np.ascontiguousarray(img))[None], size=(resize, resize),
                            mode="bilinear", align_corners=False, antialias=True)[0].numpy()
    h, w = img.shape[-2:]
    nh, nw = h // patch * patch, w // patch * patch
    if nh == 0 or nw == 0:
        raise DataError(f"field of {h}x{w} pixels is smaller than the patch size {patch}")
    top, left = (h - nh) // 2, (w - nw) // 2
    return img[..., top:top + nh, left:left + nw]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "plate"


def _run_signature(source: Any, options: FieldExtractionOptions, model_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "n_fields": len(source.records),
        "channels": list(source.channels),
        "first_key": source.records[0].key if source.records else None,
        "last_key": source.records[-1].key if source.records else None,
        "options": {k: v for k, v in asdict(options).items() if k not in ("batch_size",)},
        "model": {k: model_info.get(k) for k in ("source", "path", "name", "embed_dim", "patch_size")},
    }


def _metadata_row(rec: Any, index: int) -> dict[str, Any]:
    row: dict[str, Any] = {"Metadata_Plate": rec.plate, "Metadata_Well": rec.well, "Metadata_Site": int(rec.site)}
    for k, v in (rec.metadata or {}).items():
        if k.startswith("Metadata_") and k not in row:
            row[k] = str(v)
    row["Metadata_FieldIndex"] = int(index)
    return row


class _PatchWriter:
    """One zarr v3 array per plate: (fields_in_plate, D', h, w) float16, one chunk per field."""

    def __init__(self, root: Path, compression: str, plate_counts: dict[str, int]) -> None:
        self.root = root
        self.compression = compression
        self.plate_counts = plate_counts
        self.stores: dict[str, Any] = {}

    def write(self, plate: str, row: int, maps: np.ndarray) -> Any:
        import tensorstore as ts

        if plate not in self.stores:
            path = self.root / f"{_safe(plate)}.zarr"
            shape = [self.plate_counts[plate], *maps.shape]
            spec = array_spec(path, shape, "float16", [1, *maps.shape], self.compression)
            spec.pop("store_data_equal_to_fill_value")
            try:
                self.stores[plate] = ts.open(spec, open=True, create=True).result()
            except Exception as e:
                raise DataError(f"cannot open patch-map array {path} for shape {shape}: "
                                f"{str(e).splitlines()[0]}") from None
        store = self.stores[plate]
        if tuple(store.shape[1:]) != tuple(maps.shape):
            raise DataError(f"plate {plate}: field patch maps {maps.shape} differ from {tuple(store.shape[1:])}; "
                            "fields of one plate must share a size (use --resize)")
        return store[row].write(maps.astype(np.float16))


class _ChunkEncoder:
    """Batches the views of several fields (same size) into forward passes and combines them."""

    def __init__(self, model: Any, options: FieldExtractionOptions, n_views: int, records: list[Any],
                 patch_row: list[int], writer: _PatchWriter | None) -> None:
        self.model, self.options, self.n_views = model, options, n_views
        self.records, self.patch_row, self.writer = records, patch_row, writer
        self.rows: list[dict[str, Any]] = []
        self.embs: list[np.ndarray] = []
        self.write_futures: list[Any] = []
        self.pending: list[tuple[int, np.ndarray]] = []

    def add(self, i: int, views: np.ndarray) -> None:
        if self.pending and (views.shape[-2:] != self.pending[-1][1].shape[-2:]
                             or (len(self.pending) + 1) * self.n_views > max(self.options.batch_size, self.n_views)):
            self.flush()
        self.pending.append((i, views))

    def flush(self) -> None:
        import torch

        from dinocell.models.encode import encode_features

        if not self.pending:
            return
        opts, nv = self.options, self.n_views
        x = torch.from_numpy(np.concatenate([v for _, v in self.pending]))
        maps = None
        if opts.patch_maps:
            maps = encode_features(self.model, x, pool="patch", batch_size=opts.batch_size)
            pooled = maps.mean((2, 3)) if opts.pool == "mean" else encode_features(
                self.model, x, pool="cls", batch_size=opts.batch_size)
        else:
            pooled = encode_features(self.model, x, pool=opts.pool, batch_size=opts.batch_size)
        pooled_np = pooled.float().numpy()
        for j, (i, _) in enumerate(self.pending):
            per_view = pooled_np[j * nv:(j + 1) * nv]
            emb = per_view.mean(0) if opts.combine == "mean" else per_view.reshape(-1)
            row = _metadata_row(self.records[i], i)
            if self.writer is not None and maps is not None:
                m = maps[j * nv:(j + 1) * nv].float()
                m = m.mean(0) if opts.combine == "mean" else m.reshape(-1, *m.shape[2:])
                row["Metadata_PatchIndex"] = self.patch_row[i]
                self.write_futures.append(self.writer.write(self.records[i].plate, self.patch_row[i], m.numpy()))
            self.rows.append(row)
            self.embs.append(emb.astype(np.float32))
        self.pending.clear()


def extract_fields(output_dir: str | os.PathLike[str], source: Any = None, data_cfg: Any = None,
                   model: Any = None, model_spec: ModelSpec | None = None,
                   options: FieldExtractionOptions | None = None, device: str | None = None,
                   overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``output_dir/embeddings.parquet`` (and ``patch_maps/<plate>.zarr``); return the Parquet path.

    ``source``: a FieldSource (``.records``, ``.channels``, ``.fluorescent``, ``.load(rec)``); when
    None it is ``dinocell.data.sources.open_source(data_cfg)``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    options = options or FieldExtractionOptions()
    options.validate()
    out = Path(output_dir)
    if overwrite and out.exists():
        for p in ("parts", "patch_maps", "embeddings.parquet", RUN_FILE):
            target = out / p
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    if source is None:
        if data_cfg is None:
            raise ConfigError("extract_fields needs a source or a data config")
        from dinocell.data.sources import open_source

        source = open_source(data_cfg)
    records = list(source.records)
    if not records:
        raise DataError("the data source has no fields")
    fluorescent = list(getattr(source, "fluorescent", [True] * len(source.channels)))
    if model is None:
        model, model_info = load_model(model_spec or ModelSpec(), options.resize or 224, device)
    else:
        model_info = {"source": "given", "name": getattr(model, "timm_name", type(model).__name__),
                      "embed_dim": int(getattr(model, "embed_dim", 0)),
                      "patch_size": int(getattr(model, "patch_size", 0))}
    patch = int(getattr(model, "patch_size", 1) or 1)

    out.mkdir(parents=True, exist_ok=True)
    parts_dir = out / "parts"
    parts_dir.mkdir(exist_ok=True)
    signature = _run_signature(source, options, model_info)
    run_file = out / RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text()).get("signature")
        if previous != json.loads(json.dumps(signature)):
            raise ConfigError(f"{out} holds parts of a different extraction (fields, channels, options or "
                              "model differ); use another --output-dir or --overwrite")
    write_json_atomic(run_file, {"signature": signature, "started": time.time()})

    plate_rows: dict[str, int] = {}
    patch_row = []
    for rec in records:
        patch_row.append(plate_rows.get(rec.plate, 0))
        plate_rows[rec.plate] = patch_row[-1] + 1
    writer = _PatchWriter(out / "patch_maps", options.compression, plate_rows) if options.patch_maps else None

    n_chunks = (len(records) + options.chunk_size - 1) // options.chunk_size
    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), desc="fields", unit="field", disable=not progress)
    n_views = len(source.channels) + (1 if options.include_mean_image else 0)
    for k in range(n_chunks):
        part = parts_dir / f"part_{k:06d}.parquet"
        lo, hi = k * options.chunk_size, min((k + 1) * options.chunk_size, len(records))
        if part.is_file():
            try:
                if pq.read_metadata(part).num_rows >= 0:
                    bar.update(hi - lo)
                    continue
            except Exception:
                part.unlink()  # unreadable part (should not happen: parts are renamed into place)
        enc = _ChunkEncoder(model, options, n_views, records, patch_row, writer)
        skipped: list[str] = []
        for i in range(lo, hi):
            rec = records[i]
            try:
                img = _fit(np.asarray(source.load(rec), np.float32), patch, options.resize)
            except DataError as e:
                skipped.append(f"{rec.key}: {e}")
                bar.update(1)
                continue
            enc.add(i, field_views(img, fluorescent, options.include_mean_image))
            bar.update(1)
        enc.flush()
        for f in enc.write_futures:
            f.result()
        rows, embs = enc.rows, enc.embs
        if embs:
            mat = np.stack(embs)
            cols = {key: [r.get(key) for r in rows] for key in dict.fromkeys(k2 for r in rows for k2 in r)}
            cols.update({f"emb_{d}": mat[:, d] for d in range(mat.shape[1])})
            table = pa.table(cols)
        else:
            table = pa.table({"Metadata_FieldIndex": pa.array([], pa.int64())})
        table = table.replace_schema_metadata({"dinocell_skipped": json.dumps(skipped)})
        tmp = part.with_name(part.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, part)
    bar.close()

    tables, skipped_all = [], []
    for k in range(n_chunks):
        t = pq.read_table(parts_dir / f"part_{k:06d}.parquet")
        meta = t.schema.metadata or {}
        skipped_all += json.loads(meta.get(b"dinocell_skipped", b"[]"))
        if t.num_rows:
            tables.append(t.replace_schema_metadata(None))
    if not tables:
        raise DataError(f"no field could be embedded ({len(skipped_all)} skipped: {skipped_all[:3]})")
    final = pa.concat_tables(tables, promote_options="default")
    dest = out / "embeddings.parquet"
    tmp = dest.with_name(dest.name + ".tmp")
    pq.write_table(final, tmp)
    os.replace(tmp, dest)
    write_json_atomic(run_file, {"signature": signature, "finished": time.time(), "rows": final.num_rows,
                                 "skipped": skipped_all, "embedding_dim": sum(
                                     1 for c in final.column_names if c.startswith("emb_"))})
    return dest
