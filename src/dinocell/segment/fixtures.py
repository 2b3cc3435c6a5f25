"""Loaders for the small real annotated fixtures (``../shared/data``) that tests and benchmarks score on.

* ``pediatric_BR00143976_C03_3/``: one 6-channel Phenix Cell Painting site (1080 x 1080 uint16) with
  CellProfiler's nuclei and cell outlines of the same site (filled by
  :func:`dinocell.segment.outlines.labels_from_outlines`);
* ``dsb2018_nuclei/``: one 2018 Data Science Bowl fluorescence image with 125 human-annotated nuclei.

``root`` may be the fixture's own folder or the folder holding it (``../shared/data``).  Missing files
are a one-line :class:`~dinocell.errors.DataError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dinocell.data.decode import decode_image, read_image
from dinocell.errors import DataError
from dinocell.segment.outlines import labels_from_outlines

PEDIATRIC = "pediatric_BR00143976_C03_3"
DSB2018 = "dsb2018_nuclei"
#: the pediatric atlas's Phenix channel numbers (its README; no index file ships with the site)
PEDIATRIC_CHANNELS = {1: "Brightfield", 2: "ER", 3: "AGP", 4: "Mito", 5: "DNA", 6: "RNA"}
PEDIATRIC_FIELD = "r03c03f03p01"
#: what a missing or undecodable file is called in the one-line error of the one image reader
FILE = "fixture file"


def _folder(root: str | os.PathLike[str], name: str) -> Path:
    p = Path(root)
    if p.name != name and (p / name).is_dir():
        p = p / name
    if not p.is_dir():
        raise DataError(f"fixture folder not found: {p}")
    return p


def load_pediatric_site(root: str | os.PathLike[str],
                        ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(images ``{channel: (H, W) uint16}``, nuclei labels, cell labels) of the pediatric site; the
    labels are int32 instances filled from CellProfiler's outline images."""
    p = _folder(root, PEDIATRIC)
    images = {name: read_image(p / "images" / f"{PEDIATRIC_FIELD}-ch{ch}sk1fk1fl1.tiff")
              for ch, name in PEDIATRIC_CHANNELS.items()}
    site = PEDIATRIC.split("_", 1)[1]
    nuclei = labels_from_outlines(decode_image(p / "outlines" / f"NucleiOutlines_{site}.tiff", FILE))
    cells = labels_from_outlines(decode_image(p / "outlines" / f"CellsOutlines_{site}.tiff", FILE))
    return images, nuclei, cells


def load_dsb2018(root: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W), int32 instance labels) of the DSB 2018 fixture."""
    p = _folder(root, DSB2018)
    image = read_image(p / "img2d.tif")
    labels = decode_image(p / "mask2d.tif", FILE)
    if labels.shape != image.shape:
        raise DataError(f"{p}: mask shape {labels.shape} differs from image shape {image.shape}")
    return image, labels.astype(np.int32)


__all__ = ["DSB2018", "PEDIATRIC", "PEDIATRIC_CHANNELS", "load_dsb2018", "load_pediatric_site"]
