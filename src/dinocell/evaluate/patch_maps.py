"""Patch-feature maps of ``dinocell embed --patch-maps``: one zarr v3 array per plate (TensorStore).

Array ``patch_maps/<plate>.zarr`` has shape (fields of the plate, K, h, w) in float16, one chunk per
field, so a field's map is one read; ``Metadata_PatchIndex`` in the profile table is the row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.errors import DataError


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "plate"


class PatchMapWriter:
    """Writes field maps into per-plate arrays; rows follow the order of ``records`` within a plate."""

    def __init__(self, root: Path, records: Sequence[tuple[int, Any]], compression: str = "zstd") -> None:
        self.root, self.compression = Path(root), compression
        self.plate_of: dict[int, str] = {}
        self.rows: dict[int, int] = {}
        self.counts: dict[str, int] = {}
        for i, rec in records:
            plate = str(rec.plate)
            self.plate_of[i] = plate
            self.rows[i] = self.counts.get(plate, 0)
            self.counts[plate] = self.rows[i] + 1
        self.stores: dict[str, Any] = {}

    def row(self, index: int) -> int:
        return self.rows[index]

    def write(self, index: int, field_map: np.ndarray) -> Any:
        """Start writing field ``index``'s (K, h, w) map; returns a TensorStore future."""
        import tensorstore as ts

        from dinocell.extract.volumes import array_spec

        plate = self.plate_of[index]
        if plate not in self.stores:
            path = self.root / f"{_safe(plate)}.zarr"
            shape = [self.counts[plate], *field_map.shape]
            spec = array_spec(path, shape, "float16", [1, *field_map.shape], self.compression)
            spec.pop("store_data_equal_to_fill_value")
            try:
                self.stores[plate] = ts.open(spec, open=True, create=True).result()
            except Exception as e:
                raise DataError(f"cannot open patch-map array {path} for shape {shape}: "
                                f"{str(e).splitlines()[0]}") from None
        store = self.stores[plate]
        if tuple(store.shape[1:]) != tuple(field_map.shape):
            raise DataError(f"plate {plate}: field patch maps {field_map.shape} differ from "
                            f"{tuple(store.shape[1:])}; fields of one plate must share a size")
        return store[self.rows[index]].write(field_map.astype(np.float16))


__all__ = ["PatchMapWriter"]
