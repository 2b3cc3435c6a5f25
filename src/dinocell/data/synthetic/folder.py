"""Synthetic fields written to disk as a JUMP/Phenix export (TIFFs + ``load_data.csv``, optional masks).

Why apart from the generator: the generator renders fields in memory for the ``synthetic`` source;
this writer is the other idea, a file layout, used to build folder / load_data / S3 fixtures and demos
that exercise the real readers.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.data.synthetic.generator import SyntheticCellPainting
from dinocell.data.synthetic.render import MASK_OBJECTS, SYNTH_CHANNELS
from dinocell.errors import ConfigError
from dinocell.paths import write_atomic, write_text_atomic

TIMESTAMP = "2024-01-01T00_00_00"


def mask_file_name(field_stem: str, objects: str) -> str:
    """Cellpose-style mask file name, one per object class: ``<field>_<objects>_masks.tif``."""
    return f"{field_stem}_{objects.lower()}_masks.tif"


def _write_atomic_tiff(path: Path, image: np.ndarray) -> None:
    """One LZW TIFF through the one atomic writer (hidden per-process temp name: a reader listing the
    folder meanwhile never sees a half-written ``.tiff``)."""
    import tifffile

    write_atomic(path, lambda tmp: tifffile.imwrite(tmp, image, compression="lzw"), needed=image.nbytes,
                 unique=True)


def write_jump_folder(out_dir: str | os.PathLike, n_fields: int, size: int = 1080, seed: int = 0,
                      n_plates: int = 1, wells_per_plate: int = 8, sites_per_well: int = 4,
                      n_classes: int = 4, progress: bool = False, workers: int = 1,
                      source: str = "source_4", masks: bool = False) -> list[Path]:
    """Write ``n_fields`` synthetic fields as a JUMP/Phenix export plus ``<out_dir>/load_data.csv``.

    Layout: ``<out>/<plate>__<timestamp>-Measurement1/Images/rRRcCCfFFp01-chKsk1fk1fl1.tiff`` with the
    channel numbers of ``source`` (source_4: ch1 Mito, ch2 AGP, ch3 RNA, ch4 ER, ch5 DNA), LZW-compressed
    uint16, each file written atomically.  ``workers > 1`` renders/writes fields in threads (numpy, cv2
    and the LZW codec release the GIL).  Returns the TIFF paths in field order, channels in
    :data:`SYNTH_CHANNELS` order.

    ``masks``: also write the exact instance labels of each field beside its images,
    ``rRRcCCfFFp01_nuclei_masks.tif`` and ``..._cells_masks.tif`` (:func:`mask_file_name`; uint16,
    0 = background), and name them in ``load_data.csv`` (``FileName_Mask<Objects>`` /
    ``PathName_Mask<Objects>``).
    """
    from dinocell.data.jump import CHANNEL_MAPS, format_name

    if source not in CHANNEL_MAPS:
        raise ConfigError(f"unknown channel map '{source}' (known: {', '.join(sorted(CHANNEL_MAPS))})")
    number = {name: ch for ch, name in CHANNEL_MAPS[source].items()}
    missing = [c for c in SYNTH_CHANNELS if c not in number]
    if missing:
        raise ConfigError(f"channel map '{source}' has no channel for {', '.join(missing)}")
    ds = SyntheticCellPainting(n_fields=n_fields, size=size, seed=seed, n_plates=n_plates,
                               wells_per_plate=wells_per_plate, sites_per_well=sites_per_well,
                               n_classes=n_classes)
    out = Path(out_dir).absolute()

    def plan(i: int) -> tuple[dict[str, Any], dict[str, Path]]:
        md = ds.metadata(i)
        folder = out / f"{md['Metadata_Plate']}__{TIMESTAMP}-Measurement1" / "Images"
        paths = {c: folder / format_name(md["row"], md["col"], md["Metadata_Site"], number[c])
                 for c in SYNTH_CHANNELS}
        return md, paths

    plans = [plan(i) for i in range(n_fields)]
    for folder in sorted({p.parent for _, paths in plans for p in paths.values()}):
        folder.mkdir(parents=True, exist_ok=True)

    def work(i: int) -> None:
        if masks:
            img, labels = ds.field_and_masks(i)
            for objects in MASK_OBJECTS:
                _write_atomic_tiff(_mask_path(plans[i][1], objects), labels[objects])
        else:
            img = ds.field(i)
        for c, p in plans[i][1].items():
            _write_atomic_tiff(p, img[SYNTH_CHANNELS.index(c)])

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_fields, desc="synthetic fields", unit="field")
    try:
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(work, range(n_fields)):
                    if bar is not None:
                        bar.update(1)
        else:
            for i in range(n_fields):
                work(i)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    _write_load_data(out / "load_data.csv", plans, masks)
    return [p for _, paths in plans for p in paths.values()]


def _mask_path(paths: dict[str, Path], objects: str) -> Path:
    """``<folder>/rRRcCCfFFp01_<objects>_masks.tif`` of a field whose channel files are ``paths``."""
    first = paths[SYNTH_CHANNELS[0]]
    return first.parent / mask_file_name(first.name.split("-ch")[0], objects)


def _write_load_data(path: Path, plans: Sequence[tuple[dict[str, Any], dict[str, Path]]],
                     masks: bool = False) -> None:
    """CellProfiler-style load_data table (absolute PathName folders), written atomically."""
    meta = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Label", "Metadata_Control"]
    cols = meta + [f"{kind}_Orig{c}" for c in SYNTH_CHANNELS for kind in ("FileName", "PathName")]
    objects = MASK_OBJECTS if masks else ()
    cols += [f"{kind}_Mask{o.capitalize()}" for o in objects for kind in ("FileName", "PathName")]
    text = io.StringIO()  # csv's \r\n line ends, as they were when written to an open(newline="") file
    w = csv.writer(text)
    w.writerow(cols)
    for md, paths in plans:
        row = [md[m] for m in meta]
        for c in SYNTH_CHANNELS:
            row += [paths[c].name, str(paths[c].parent)]
        for o in objects:
            mp = _mask_path(paths, o)
            row += [mp.name, str(mp.parent)]
        w.writerow(row)
    write_text_atomic(path, text.getvalue(), unique=True)
