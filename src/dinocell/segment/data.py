"""Annotated fields: images from any dinocell source plus instance masks, and the training crops.

Where masks come from (first hit wins):

* the synthetic source: the generator's exact labels (:meth:`SyntheticCellPainting.field_and_masks`);
* a load_data table: columns ``FileName_Mask<Objects>`` / ``PathName_Mask<Objects>`` (also with
  CytoTable's ``Image_`` prefix); relative folders and bare file names mean "relative to the table";
* beside the images or in a sibling mask folder (``masks/``, ``<images>_masks/``, any ``*_masks/``
  next to the image folder, or ``masks/`` inside it), under any of these names (case-insensitive,
  ``.tif``/``.tiff``/``.png``): ``<field>_<objects>_masks`` (cellpose-style, and what ``segment
  predict`` writes), ``<field>_masks`` (cellpose's own) and ``<field>_Mask<Objects>`` (CellProfiler's
  ``SaveImages`` of a ``ConvertObjectsToImage`` named ``Mask<Objects>``).  ``<field>`` is the JUMP
  field stem (``r01c01f01p01``), an image file's stem, the common prefix of the channel files, or
  ``<plate>_<well>_s<site>`` / ``<plate>_<well>_<site>``.

A mask with a single foreground value is a binary mask: it becomes instances by connected components,
with one warning per run (touching objects merge), not one per field.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dinocell.data.decode import decode_image
from dinocell.data.field import FieldRecord
from dinocell.data.sources import FieldSource, SyntheticSource
from dinocell.data.synthetic import mask_file_name
from dinocell.errors import DataError

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".tif", ".tiff", ".png")


class MissingMaskError(DataError):
    """A field has no mask for the requested object class (skippable, unlike a malformed mask)."""
MEAN = "mean"


def input_plane(planes: np.ndarray, channels: Sequence[str], fluorescent: Sequence[bool], which: str) -> np.ndarray:
    """One (H, W) float32 input image: the channel named ``which`` or the fluorescent ``mean``."""
    if which.lower() == MEAN:
        idx = [i for i, f in enumerate(fluorescent) if f] or list(range(len(channels)))
        return planes[idx].mean(0).astype(np.float32)
    lower = [c.lower() for c in channels]
    if which.lower() not in lower:
        raise DataError(f"unknown channel '{which}'; available: {', '.join(channels)}, mean")
    return np.ascontiguousarray(planes[lower.index(which.lower())], dtype=np.float32)


def as_instances(mask: np.ndarray, name: str, on_binary: Callable[[str], None] | None = None) -> np.ndarray:
    """Instance labels (uint32); a binary mask becomes instances by connected components and is
    reported to ``on_binary(name)`` (default: a warning)."""
    from skimage.measure import label

    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise DataError(f"mask {name} has shape {mask.shape}; expected one 2-D label image")
    if np.issubdtype(mask.dtype, np.floating):
        mask = np.rint(mask)
    values = np.unique(mask)
    if values.size == 2 and values[0] == 0:
        (on_binary or _warn_binary)(name)
        return label(mask > 0, connectivity=1).astype(np.uint32)
    return mask.astype(np.uint32)


def _warn_binary(name: str) -> None:
    log.warning("mask %s is binary: objects taken as connected components (touching ones merge)", name)


def read_mask(path: str, on_binary: Callable[[str], None] | None = None) -> np.ndarray:
    """Read a label image (uint16/uint32 TIFF or PNG) without clipping the label range."""
    return as_instances(decode_image(path, "mask"), path, on_binary)


def _stems(rec: FieldRecord) -> list[str]:
    """Candidate ``<field>`` names of a record's files (JUMP stem, file stems, common prefix)."""
    names = [Path(p).name for p in rec.channels.values()]
    out: list[str] = []
    for n in names:
        if "-ch" in n:
            out.append(n.split("-ch")[0])
    stems = [n.rsplit(".", 1)[0] for n in names]
    prefix = os.path.commonprefix(stems).rstrip("_-. ") if stems else ""
    out += ([prefix] if prefix else []) + stems
    if rec.well:
        out += [f"{rec.plate}_{rec.well}_s{rec.site}", f"{rec.plate}_{rec.well}_{rec.site}"]
    return list(dict.fromkeys(out))


def mask_folders(image_folder: Path) -> list[Path]:
    """Where a field's masks may be: its image folder, ``masks/`` inside it, and the sibling folders
    ``masks/``, ``<images>_masks/`` and any other ``*_masks/``."""
    parent = image_folder.parent
    out = [image_folder, image_folder / "masks", parent / "masks", parent / f"{image_folder.name}_masks"]
    try:
        out += sorted(p for p in parent.iterdir() if p.is_dir() and p.name.lower().endswith("_masks"))
    except OSError:
        pass
    return [p for p in dict.fromkeys(out) if p != parent]


def mask_names(stem: str, objects: str) -> list[str]:
    """File names a ``<stem>`` field's ``objects`` mask may have (compared case-insensitively)."""
    cp = "Mask" + objects[:1].upper() + objects[1:]
    bases = [mask_file_name(stem, objects)[: -len(".tif")], f"{stem}_masks", f"{stem}_{cp}"]
    return [b + suffix for b in bases for suffix in MASK_SUFFIXES]


def mask_columns(table: Any, objects: str, base: str | os.PathLike[str] | None = None,
                 ) -> dict[tuple[str, str, str], str]:
    """``(plate, well, site) -> mask path`` from a load_data table's ``*_Mask<Objects>`` columns; a
    relative path is joined to ``base`` (the table's folder), never to the working directory."""
    cols = {c.lower(): c for c in table.columns}
    fn, pn = cols.get(f"filename_mask{objects.lower()}"), cols.get(f"pathname_mask{objects.lower()}")
    if fn is None:
        return {}
    out = {}
    for row in table.to_dict("records"):
        site = str(row.get("Metadata_Site", "1"))
        site = str(int(float(site))) if site.replace(".", "", 1).isdigit() else site
        folder = str(row.get(pn, "")) if pn else ""
        name = str(row[fn])
        path = os.path.join(folder, name) if folder and folder.lower() != "nan" else name
        if base is not None and "://" not in path and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(os.fspath(base), path))
        out[(str(row.get("Metadata_Plate", "")), str(row.get("Metadata_Well", "")), site)] = path
    return out


@dataclass
class MaskFinder:
    """Finds the ``objects`` mask of each field of one source (one finder per run: it also keeps the
    binary-mask note to one line per run)."""

    source: FieldSource
    objects: str
    table: dict[tuple[str, str, str], str] | None = None
    binary: int = 0
    _listings: dict[Path, dict[str, str]] = field(default_factory=dict, repr=False)
    _folders: dict[Path, list[Path]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_source(cls, source: FieldSource, objects: str, spec: str) -> MaskFinder:
        """``spec`` is the source string; a load_data file contributes its ``Mask`` columns."""
        table = None
        if spec.lower().endswith((".csv", ".csv.gz", ".parquet", ".pq")):
            from dinocell.data.jump import read_load_data
            from dinocell.data.tables import normalise_columns

            path = Path(spec)
            table = mask_columns(normalise_columns(read_load_data(path)), objects,
                                 base=path.resolve().parent) or None
        return cls(source, objects, table)

    def _listing(self, folder: Path) -> dict[str, str]:
        """Lower-case name -> name of a folder's files (listed once per folder)."""
        if folder not in self._listings:
            try:
                self._listings[folder] = {n.lower(): n for n in os.listdir(folder)}
            except OSError:
                self._listings[folder] = {}
        return self._listings[folder]

    def candidates(self, rec: FieldRecord) -> list[str]:
        if self.table is not None:
            hit = self.table.get((rec.plate, rec.well, str(rec.site)))
            return [hit] if hit else []
        if not rec.channels:
            return []
        for p in {Path(p).parent for p in rec.channels.values()} - self._folders.keys():
            self._folders[p] = mask_folders(p)  # the parent folder is listed once per image folder
        folders = list(dict.fromkeys(f for p in rec.channels.values() for f in self._folders[Path(p).parent]))
        return [str(folder / name) for folder in folders for stem in _stems(rec)
                for name in mask_names(stem, self.objects)]

    def find(self, rec: FieldRecord) -> str | None:
        if self.table is not None:
            return next((p for p in self.candidates(rec) if os.path.isfile(p)), None)
        for cand in self.candidates(rec):
            p = Path(cand)
            actual = self._listing(p.parent).get(p.name.lower())
            if actual is not None:
                return str(p.parent / actual)
        return None

    def _on_binary(self, name: str) -> None:
        if self.binary == 0:
            log.warning("mask %s is binary: objects taken as connected components (touching ones merge); "
                        "further binary %s masks of this run are not reported", name, self.objects)
        self.binary += 1

    def masks(self, rec: FieldRecord) -> np.ndarray:
        """The field's instance labels; DataError when there are none."""
        if isinstance(self.source, SyntheticSource):
            _, masks = self.source.generator.field_and_masks(int(rec.metadata["index"]))
            if self.objects.lower() not in masks:
                raise DataError(f"the synthetic source has masks for {', '.join(masks)}, not '{self.objects}'")
            return masks[self.objects.lower()].astype(np.uint32)
        path = self.find(rec)
        if path is None:
            looked = self.candidates(rec)[:2]
            raise MissingMaskError(f"no {self.objects} masks found for field {rec.key} (looked for "
                            f"{', '.join(looked) if looked else 'FileName_Mask' + self.objects.capitalize()})")
        return read_mask(path, self._on_binary)


def annotated_field(source: FieldSource, finder: MaskFinder, rec: FieldRecord) -> tuple[np.ndarray, np.ndarray]:
    """(planes (C, H, W) float32 in [0, 1], labels (H, W) uint32) with matching shapes."""
    labels = finder.masks(rec)
    planes = source.load(rec)
    if labels.shape != planes.shape[1:]:
        raise DataError(f"mask of field {rec.key} has shape {labels.shape} but its images are "
                        f"{planes.shape[1]}x{planes.shape[2]}")
    return planes, labels


def iter_annotated(source: FieldSource, finder: MaskFinder, limit: int | None = None,
                   ) -> Iterator[tuple[FieldRecord, np.ndarray, np.ndarray]]:
    """Annotated fields of ``source``; fields without masks are skipped with a warning, and a source
    with no annotated field at all is a DataError (bad shapes always fail)."""
    n = 0
    first_missing: str | None = None
    for rec in source.records:
        try:
            planes, labels = annotated_field(source, finder, rec)
        except MissingMaskError as e:
            first_missing = first_missing or str(e)
            log.warning("%s", e)
            continue
        yield rec, planes, labels
        n += 1
        if limit is not None and n >= limit:
            return
    if n == 0:
        raise DataError(first_missing or f"no annotated fields in {source.name}")


class CropDataset(Dataset):
    """Random crops (+ flips / 90-degree turns) of in-memory (input, targets) fields.

    Index ``i`` draws crop ``i`` from a generator seeded by ``(seed, i)``, so a sample does not
    depend on worker scheduling.  Fields smaller than the crop are reflect-padded (targets zero-padded).
    """

    def __init__(self, inputs: list[np.ndarray], targets: list[np.ndarray], crop: int, length: int,
                 seed: int = 0) -> None:
        if not inputs:
            raise DataError("no training fields")
        self.inputs, self.targets = inputs, targets
        self.crop, self.length, self.seed = int(crop), int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(idx)])
        k = int(rng.integers(len(self.inputs)))
        x, t = self.inputs[k], self.targets[k]
        c = self.crop
        ph, pw = max(0, c - x.shape[0]), max(0, c - x.shape[1])
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw)), mode="reflect" if min(x.shape) > 1 else "edge")
            t = np.pad(t, ((0, 0), (0, ph), (0, pw)))
        y0 = int(rng.integers(x.shape[0] - c + 1))
        x0 = int(rng.integers(x.shape[1] - c + 1))
        x, t = x[y0:y0 + c, x0:x0 + c], t[:, y0:y0 + c, x0:x0 + c]
        flows = t.shape[0] > 2
        if rng.random() < 0.5:
            x, t = x[:, ::-1], t[:, :, ::-1]
            if flows:
                t = t.copy()
                t[3] = -t[3]
        r = int(rng.integers(4))
        if r:
            x, t = np.rot90(x, r), np.rot90(t, r, axes=(1, 2))
            if flows:
                t = t.copy()
                for _ in range(r):  # rot90 (counter-clockwise): (dy, dx) -> (-dx, dy)
                    t[2], t[3] = -t[3].copy(), t[2].copy()
        return {"image": torch.from_numpy(np.ascontiguousarray(x))[None],
                "target": torch.from_numpy(np.ascontiguousarray(t))}
