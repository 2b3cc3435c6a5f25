"""Field sources: where Cell Painting fields come from.

A :class:`FieldSource` knows its fields (:class:`FieldRecord`), its channel names and which channels
are fluorescent, and can load one field as a (C,H,W) array.  Sources: a local folder (JUMP names or a
``pattern``), a load_data CSV/Parquet, an ``s3://`` prefix (``data/s3.py``) and ``synthetic``.
:class:`FieldDataset` turns a source into multi-view samples, skipping (and counting) bad fields.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dinocell.data import jump
from dinocell.data.decode import read_image, scale_field
from dinocell.data.field import FieldRecord, is_fluorescent
from dinocell.errors import DataError, UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
LOAD_DATA_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")


class FieldSource:
    """Base class: a list of fields with named channels and a way to read them."""

    channels: list[str]
    fluorescent: list[bool]
    records: list[FieldRecord]
    name: str = "source"

    def __init__(self, scaling: Any = None, stain: Any = None) -> None:
        self.scaling = scaling
        self.stain = stain
        self.skipped: list[str] = []

    # -- reading ---------------------------------------------------------------------------------
    def load_raw(self, rec: FieldRecord) -> np.ndarray:
        """The field's selected channels as a (C,H,W) uint8/uint16 array."""
        planes = []
        for ch in self.channels:
            if ch not in rec.channels:
                raise DataError(f"field {rec.key} has no channel {ch}")
            planes.append(read_image(rec.channels[ch]))
        shapes = {p.shape for p in planes}
        if len(shapes) != 1:
            raise DataError(f"field {rec.key} has channels of different sizes: {sorted(shapes)}")
        return np.stack(planes)

    def load(self, rec: FieldRecord) -> np.ndarray:
        """The field scaled per channel into float32 [0,1] (stain normalisation first, if on)."""
        raw = self.load_raw(rec)
        if self.stain is not None and getattr(self.stain, "use_stain_norm", False):
            from dinocell.data.stain import StainNormalizer

            raw = StainNormalizer(self.stain)(_to_unit(raw))
        if self.scaling is None:
            return _to_unit(raw)
        return scale_field(np.asarray(raw), self.scaling)

    # -- reporting -------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Summary for ``dinocell data ls``."""
        return {
            "source": self.name,
            "fields": len(self.records),
            "channels": list(self.channels),
            "fluorescent": [c for c, f in zip(self.channels, self.fluorescent, strict=True) if f],
            "plates": sorted({r.plate for r in self.records}),
            "wells": len({(r.plate, r.well) for r in self.records}),
            "skipped": list(self.skipped),
        }

    def verify(self) -> list[str]:
        """Check every local file's TIFF header (no decoding); unreadable fields are dropped from
        ``records``, reported in ``skipped`` and returned.  All fields unreadable -> DataError."""
        from dinocell.data.decode import check_image

        bad: list[str] = []
        good = []
        for rec in self.records:
            problems = [f"{os.path.basename(p)}: {why}" for c in self.channels
                        if (p := rec.channels.get(c)) and not p.startswith("s3://") and (why := check_image(p))]
            if problems:
                bad.append(f"{rec.key}: {'; '.join(problems)}")
            else:
                good.append(rec)
        if self.records and not good:
            raise DataError(f"no readable field in {self.name}: {bad[0]}")
        self.records = good
        self.skipped.extend(bad)
        return bad

    def __len__(self) -> int:
        return len(self.records)


def _to_unit(raw: np.ndarray) -> np.ndarray:
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / 255.0
    if raw.dtype == np.uint16:
        return raw.astype(np.float32) / 65535.0
    return raw.astype(np.float32)


def select_channels(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """Choose channels by name (case-insensitive); unknown names fail with the available ones."""
    if not wanted:
        return list(available)
    lower = {a.lower(): a for a in available}
    out = []
    for w in wanted:
        if w.lower() not in lower:
            raise DataError(f"unknown channel '{w}'; available: {', '.join(available) or 'none'}")
        out.append(lower[w.lower()])
    return out


def _common_channels(records: Sequence[FieldRecord]) -> list[str]:
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        for c in r.channels:
            counts[c] += 1
    order = {c: i for i, c in enumerate(jump.STANDARD_CHANNELS)}
    return sorted(counts, key=lambda c: (order.get(c, 99), c))


class RecordSource(FieldSource):
    """A source defined by a list of records (folder or load_data)."""

    def __init__(self, records: list[FieldRecord], channels: Sequence[str] | None, name: str,
                 scaling: Any = None, stain: Any = None, skipped: list[str] | None = None) -> None:
        super().__init__(scaling, stain)
        self.name = name
        available = _common_channels(records)
        self.channels = select_channels(available, channels)
        keep = [r for r in records if all(c in r.channels for c in self.channels)]
        self.skipped = list(skipped or [])
        self.skipped += [f"{r.key}: missing channel(s) "
                         f"{', '.join(c for c in self.channels if c not in r.channels)}"
                         for r in records if r not in keep]
        if not keep:
            raise DataError(f"no field in {name} has all of the channels {', '.join(self.channels)}")
        self.records = keep
        self.fluorescent = [is_fluorescent(c) for c in self.channels]


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise DataError(f"bad --pattern regex: {e}") from None
    if "channel" not in rx.groupindex:
        raise DataError("--pattern needs a named group (?P<channel>...); optional: plate, well, site")
    return rx


def _group_by_pattern(paths: list[str], root: Path, rx: re.Pattern[str]) -> tuple[list[FieldRecord], list[str]]:
    groups: dict[tuple[str, str, int], dict[str, str]] = defaultdict(dict)
    unmatched = []
    for p in paths:
        rel = os.path.relpath(p, root)
        m = rx.search(rel)
        if not m:
            unmatched.append(p)
            continue
        d = m.groupdict()
        plate = d.get("plate") or jump.plate_from_path(str(Path(p).parent))
        site = int(d["site"]) if d.get("site") and d["site"].isdigit() else 1
        groups[(plate, d.get("well") or "A01", site)][d["channel"]] = p
    records = [FieldRecord(plate=pl, well=w, site=s, channels=dict(ch),
                           metadata={"Metadata_Plate": pl, "Metadata_Well": w, "Metadata_Site": str(s)})
               for (pl, w, s), ch in sorted(groups.items())]
    return records, unmatched


def folder_source(path: str, data_cfg: Any) -> RecordSource:
    """A local folder, searched recursively, of JUMP-named TIFFs (or files matching ``pattern``)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"path not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder or load_data file: {root}")
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"no images (*.tif, *.tiff, *.png) found in {root}")
    if data_cfg.pattern:
        records, unmatched = _group_by_pattern(paths, root, _compile_pattern(data_cfg.pattern))
    elif data_cfg.load_data:
        df = jump.read_load_data(data_cfg.load_data)
        cmap = jump.channel_map_from_load_data(df)
        if not cmap:
            raise DataError(f"load_data file {data_cfg.load_data} names no JUMP-style image files")
        jump.CHANNEL_MAPS["_load_data"] = cmap
        records, unmatched = jump.group_files(paths, "_load_data")
        _attach_load_data_metadata(records, df)
    else:
        records, unmatched = jump.group_files(paths, data_cfg.source_map)
    if not records:
        hint = " (use --pattern for non-JUMP file names)" if not data_cfg.pattern else ""
        raise DataError(f"no image in {root} matches the expected file names{hint}")
    skipped = [f"{os.path.relpath(p, root)}: name not recognised" for p in unmatched]
    return RecordSource(records, data_cfg.channels, str(root), data_cfg.scaling, data_cfg.stain, skipped)


def _attach_load_data_metadata(records: list[FieldRecord], df: Any) -> None:
    meta_cols = [c for c in df.columns if c.startswith("Metadata_")]
    by_key = {}
    for row in df[meta_cols].to_dict("records"):
        key = (row.get("Metadata_Well"), str(row.get("Metadata_Site")))
        by_key[key] = row
    for r in records:
        row = by_key.get((r.well, str(r.site)))
        if row:
            r.metadata.update({k: str(v) for k, v in row.items()})
            r.plate = str(row.get("Metadata_Plate", r.plate))


def load_data_source(path: str, data_cfg: Any, root: str | None = None) -> RecordSource:
    """Fields listed in a load_data CSV/CSV.gz/Parquet (its PathName_Orig* folders or ``root``)."""
    df = jump.read_load_data(path)
    records = jump.fields_from_load_data(df, root=root)
    if not records:
        raise DataError(f"load_data file {path} lists no fields")
    return RecordSource(records, data_cfg.channels, str(path), data_cfg.scaling, data_cfg.stain)


class SyntheticSource(FieldSource):
    """The built-in synthetic Cell Painting generator, rendered on the fly (offline default)."""

    name = "synthetic"

    def __init__(self, data_cfg: Any) -> None:
        super().__init__(data_cfg.scaling, data_cfg.stain)
        from dinocell.data.synthetic import SYNTH_CHANNELS, SyntheticCellPainting

        self.generator = SyntheticCellPainting.from_config(data_cfg.synthetic)
        self.channels = select_channels(list(SYNTH_CHANNELS), data_cfg.channels)
        self._idx = [list(SYNTH_CHANNELS).index(c) for c in self.channels]
        self.fluorescent = [True] * len(self.channels)
        self.records = []
        for i in range(len(self.generator)):
            meta = {k: str(v) for k, v in self.generator.metadata(i).items()}
            meta["index"] = str(i)
            self.records.append(FieldRecord(plate=meta["Metadata_Plate"], well=meta["Metadata_Well"],
                                            site=int(meta["Metadata_Site"]), metadata=meta))

    def load_raw(self, rec: FieldRecord) -> np.ndarray:
        return self.generator.field(int(rec.metadata["index"]))[self._idx]


def open_source(data_cfg: Any, source: str | None = None) -> FieldSource:
    """Open ``source`` (default ``data_cfg.source``): synthetic, folder, load_data file or s3:// prefix."""
    src = str(source if source is not None else data_cfg.source)
    if src == "synthetic":
        return SyntheticSource(data_cfg)
    if src.startswith("s3://"):
        from dinocell.data.s3 import S3FieldSource

        return S3FieldSource(src, data_cfg)
    if src.lower().endswith(LOAD_DATA_SUFFIXES):
        if not Path(src).exists():
            raise DataError(f"load_data file not found: {src}")
        return load_data_source(src, data_cfg)
    return folder_source(src, data_cfg)


# --------------------------------------------------------------------------------------------------
# Torch datasets
# --------------------------------------------------------------------------------------------------


class FieldDataset(Dataset):
    """Map-style dataset of multi-view samples; index ``i`` is field ``i // repeats``.

    Samples drawn from the same field back to back (``repeats`` > 1 with :class:`dinocell.train.data.StreamSampler`) reuse
    the decoded field, so decode cost is paid once per field.  A corrupt or missing field is skipped
    (logged once, counted in ``skipped``) and the next field is used instead; if every field fails the
    dataset raises :class:`DataError`.
    """

    def __init__(self, source: FieldSource, transform: Callable[..., dict[str, Any]] | None,
                 repeats: int = 1, seed: int = 0) -> None:
        self.source = source
        self.transform = transform
        self.repeats = max(1, int(repeats))
        self.seed = seed
        self.skipped: dict[str, str] = {}
        self._cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.source) * self.repeats

    def load_field(self, field_idx: int) -> torch.Tensor:
        """Decoded, scaled field as a float tensor (C,H,W); cached for repeated draws."""
        if self._cache is not None and self._cache[0] == field_idx:
            return self._cache[1]
        x = torch.from_numpy(np.ascontiguousarray(self.source.load(self.source.records[field_idx])))
        self._cache = (field_idx, x)
        return x

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """``idx`` may exceed ``len(self)``: :class:`dinocell.train.data.StreamSampler` adds ``stream_pos * len`` so that the
        augmentation seed is a pure function of (seed, epoch, sample), which makes resumed runs
        bit-identical to uninterrupted ones."""
        n = len(self.source)
        field_idx = (idx // self.repeats) % n
        for attempt in range(n):
            fi = (field_idx + attempt) % n
            rec = self.source.records[fi]
            if rec.key in self.skipped:
                continue
            try:
                x = self.load_field(fi)
            except DataError as e:
                self.skipped[rec.key] = str(e)
                log.warning("skipping field %s: %s", rec.key, e)
                continue
            return self._make_sample(x, fi, idx)
        raise DataError(f"every field of {self.source.name} failed to load; first error: "
                        f"{next(iter(self.skipped.values()), 'unknown')}")

    def _make_sample(self, x: torch.Tensor, field_idx: int, idx: int) -> dict[str, Any]:
        rec = self.source.records[field_idx]
        if self.transform is None:
            sample: dict[str, Any] = {"image": x}
        else:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + idx) % (2**63 - 1))
            sample = self.transform(x, generator=g)
        sample["index"] = field_idx
        if "label" in rec.metadata:
            sample["label"] = int(rec.metadata["label"])
        return sample


def load_resized_fields(source: FieldSource, n: int, size: int) -> tuple[list[torch.Tensor], list[int]]:
    """Up to ``n`` fields spread evenly over ``source``, resized to ``size``, with their labels (-1 if
    none).  Spread, because neighbouring records are sites of one well (one phenotype); fields that
    fail to load are left out.  Used for diagnostics examples and held-out evaluation."""
    import torch.nn.functional as F

    if n < 1 or len(source) == 0:
        return [], []
    picks = np.unique(np.linspace(0, len(source) - 1, min(n, len(source))).astype(int))
    fields, labels = [], []
    for i in picks:
        rec = source.records[i]
        try:
            x = torch.from_numpy(source.load(rec)).float()
        except UserError:  # DataError, or an S3 error surfaced to the user
            continue
        fields.append(F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False)[0])
        labels.append(int(rec.metadata.get("label", -1)))
    return fields, labels
