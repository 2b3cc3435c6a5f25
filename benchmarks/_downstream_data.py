"""Real fixtures, folders the segment library reads, the classical baseline and the picture.

The downstream benchmark trains and evaluates through ``dinocell.segment`` exactly as a user would:
it writes each image region as a JUMP-named field folder (``r01c01f01p01-ch<k>sk1fk1fl1.tiff`` per
channel plus the cellpose-style ``r01c01f01p01_<objects>_masks.tif``) and points ``data.source`` at
it.  The classical baseline is CellProfiler's IdentifyPrimaryObjects recipe (Otsu threshold, holes
filled, distance-transform maxima as seeds, watershed), scored by the same AP code.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dinocell.segment.fixtures import load_dsb2018, load_pediatric_site  # noqa: F401 (re-exported)
from dinocell.segment.scale import median_diameter as _median_diameter

FIELD = "r01c01f01p01"
# Phenix channel numbers of the pediatric site (shared/data/README.md)
PEDIATRIC_CHANNELS = {1: "Brightfield", 2: "ER", 3: "AGP", 4: "Mito", 5: "DNA", 6: "RNA"}



def median_diameter(*labels: np.ndarray) -> float:
    """Median equivalent-circle diameter (px) of the objects of one or more label images (0 without any)."""
    return _median_diameter(labels) or 0.0


def write_field(folder: Path, planes: dict[int, np.ndarray], labels: np.ndarray, objects: str) -> Path:
    """One JUMP-named field (channel number -> plane) and its instance mask; returns ``folder``."""
    import tifffile

    from dinocell.data.synthetic import mask_file_name

    folder.mkdir(parents=True, exist_ok=True)
    for k, plane in planes.items():
        tifffile.imwrite(folder / f"{FIELD}-ch{k}sk1fk1fl1.tiff", np.ascontiguousarray(plane))
    tifffile.imwrite(folder / mask_file_name(FIELD, objects), np.ascontiguousarray(labels.astype(np.uint32)))
    return folder


def classical_nuclei(image: np.ndarray, diameter: float) -> np.ndarray:
    """Otsu + distance-transform watershed, as CellProfiler's IdentifyPrimaryObjects with a typical
    diameter (its one user parameter; here the training half's median nucleus diameter)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import relabel_sequential, watershed

    img = gaussian(np.asarray(image, dtype=np.float32), sigma=max(1.0, diameter / 10.0), preserve_range=True)
    fg = ndi.binary_fill_holes(img > threshold_otsu(img))
    comps, _ = ndi.label(fg)
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg), max(1.0, diameter / 10.0))
    peaks = peak_local_max(dist, min_distance=max(1, int(diameter / 3.0)), labels=comps, exclude_border=False)
    markers = np.zeros(fg.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    lab = watershed(-dist, markers, mask=fg)
    small = np.bincount(lab.ravel()) < 0.1 * np.pi * diameter ** 2 / 4.0  # below a tenth of a typical area
    small[0] = False
    lab[small[lab]] = 0
    return relabel_sequential(lab)[0].astype(np.uint32)


def _gray(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, (0.5, 99.5))
    return (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _colour(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    lut = rng.integers(60, 256, size=(int(labels.max()) + 1, 3)).astype(np.uint8)
    lut[0] = 0
    return lut[labels.astype(np.int64)]


def side_by_side(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], max_side: int = 320) -> None:
    """PNG with one row per channel: image | truth | prediction (labels in random colours)."""
    from PIL import Image, ImageDraw

    tiles = []
    for name, img, truth, pred in rows:
        cells = [np.repeat(_gray(img)[..., None], 3, -1), _colour(truth), _colour(pred)]
        row = np.concatenate([np.pad(c, ((0, 4), (0, 4), (0, 0)), constant_values=255) for c in cells], 1)
        pic = Image.fromarray(row)
        f = max_side / max(img.shape)
        if f < 1:
            pic = pic.resize((int(pic.width * f), int(pic.height * f)), Image.NEAREST)
        ImageDraw.Draw(pic).text((3, 3), f"{name}: image | truth | prediction", fill=(255, 255, 0))
        tiles.append(np.asarray(pic))
    width = max(t.shape[1] for t in tiles)
    grid = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=255)
                           for t in tiles], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
