"""Per-object measurements named as CellProfiler / pycytominer name them.

One row per object: ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site`` (and the field's other
``Metadata_*``), then ``<Objects>_Number_Object_Number``, ``<Objects>_AreaShape_Area``,
``..._Center_X/Y``, ``..._BoundingBoxMinimum_X/Y``, ``..._BoundingBoxMaximum_X/Y`` and
``<Objects>_Intensity_MeanIntensity_<Channel>`` for every channel -- the names a pycytominer
single-cell table uses, so profiles built from these objects join CellProfiler ones.  Intensities are
on the raw image divided by its type's maximum (CellProfiler's 0..1 scaling); bounding-box maxima
are exclusive, as CellProfiler's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def object_prefix(objects: str) -> str:
    """``nuclei`` -> ``Nuclei`` (CellProfiler object names are capitalised)."""
    return objects[:1].upper() + objects[1:]


def unit_intensity(raw: np.ndarray) -> np.ndarray:
    """Raw planes scaled by their integer type's maximum (floats pass through)."""
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
    return raw.astype(np.float32)


def measure_objects(labels: np.ndarray, raw: np.ndarray, channels: Sequence[str], objects: str,
                    metadata: dict[str, Any]) -> pd.DataFrame:
    """The object table of one field: ``labels`` (H, W), ``raw`` (C, H, W) in ``channels`` order."""
    from skimage.measure import regionprops_table

    pre = object_prefix(objects)
    meta = {k: v for k, v in metadata.items() if k.startswith("Metadata_")}
    intensity = np.moveaxis(unit_intensity(np.asarray(raw)), 0, -1)
    props = regionprops_table(labels.astype(np.int64), intensity_image=intensity,
                              properties=("label", "area", "centroid", "bbox", "intensity_mean"))
    n = len(props["label"])
    cols: dict[str, Any] = {k: [v] * n for k, v in meta.items()}
    cols[f"{pre}_Number_Object_Number"] = props["label"].astype(np.int64)
    cols[f"{pre}_AreaShape_Area"] = props["area"].astype(np.int64)
    cols[f"{pre}_AreaShape_Center_X"] = props["centroid-1"]
    cols[f"{pre}_AreaShape_Center_Y"] = props["centroid-0"]
    cols[f"{pre}_AreaShape_BoundingBoxMinimum_X"] = props["bbox-1"].astype(np.int64)
    cols[f"{pre}_AreaShape_BoundingBoxMinimum_Y"] = props["bbox-0"].astype(np.int64)
    cols[f"{pre}_AreaShape_BoundingBoxMaximum_X"] = props["bbox-3"].astype(np.int64)
    cols[f"{pre}_AreaShape_BoundingBoxMaximum_Y"] = props["bbox-2"].astype(np.int64)
    for c, name in enumerate(channels):
        key = f"intensity_mean-{c}" if f"intensity_mean-{c}" in props else "intensity_mean"
        cols[f"{pre}_Intensity_MeanIntensity_{name}"] = props[key].astype(np.float64)
    return pd.DataFrame(cols)
