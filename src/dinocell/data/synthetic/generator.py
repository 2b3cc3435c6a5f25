"""The synthetic Cell Painting generator: the built-in dataset, so everything runs offline and is testable.

Fields are drawn by :func:`dinocell.data.synthetic.render.render_field`; this module decides which
phenotype, plate and well each field index has.

Determinism: field ``i`` is rendered from ``np.random.default_rng([seed, i])`` alone (random access,
no state carried between fields); plate-level intensity effects come from ``(seed, plate)``.

Plate layout: the nominal experiment is ``n_plates x wells_per_plate x sites_per_well``.  Index ``i``
runs sites fastest, then plates, then wells (so any prefix of the dataset already has replicate plates);
indices past the nominal layout continue into further groups of ``n_plates`` plates with the same well
layout (``SYNTH-P03`` ...).  The phenotype is a function of the well only, ``well_index % n_classes``,
so replicate wells share their label on every plate, and label 0 ("control") occupies every
``n_classes``-th well.  Wells fill a 384-well plate row by row (``A01`` ... ``A24``, ``B01`` ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dinocell.data.synthetic.render import MAX_CLASSES, PHENOTYPES, SYNTH_CHANNELS, render_field
from dinocell.errors import ConfigError

if TYPE_CHECKING:
    from dinocell.config import SyntheticConfig

PLATE_ROWS, PLATE_COLS = 16, 24  # 384-well plate


def label_name(label: int) -> str:
    """Metadata_Label of a class: ``control``, ``pheno1``, ``pheno2`` ..."""
    return "control" if label == 0 else f"pheno{label}"


def well_position(well_index: int) -> tuple[int, int]:
    """Well index (0-based, row by row on a 384-well plate) -> 1-based (row, column)."""
    return well_index // PLATE_COLS + 1, well_index % PLATE_COLS + 1


def _well_name(row: int, col: int) -> str:
    return f"{chr(ord('A') + row - 1)}{col:02d}"


class SyntheticCellPainting:
    """Random-access synthetic Cell Painting fields with plate/well/site metadata and phenotype labels.

    ``field(i)`` renders on demand (a few ms at 128 px), ``metadata(i)`` is arithmetic only.
    """

    channels: tuple[str, ...] = SYNTH_CHANNELS

    def __init__(self, n_fields: int = 256, size: int = 128, seed: int = 0, n_plates: int = 2,
                 wells_per_plate: int = 8, sites_per_well: int = 4, n_classes: int = 4) -> None:
        if n_fields < 1:
            raise ConfigError(f"synthetic n_fields must be >= 1, got {n_fields}")
        if size < 16:
            raise ConfigError(f"synthetic size must be >= 16 px, got {size}")
        if not 2 <= n_classes <= MAX_CLASSES:
            raise ConfigError(f"synthetic n_classes must be in [2, {MAX_CLASSES}], got {n_classes}")
        if n_plates < 1:
            raise ConfigError(f"synthetic n_plates must be >= 1, got {n_plates}")
        if not n_classes <= wells_per_plate <= PLATE_ROWS * PLATE_COLS:
            raise ConfigError(f"synthetic wells_per_plate must be in [n_classes={n_classes}, "
                              f"{PLATE_ROWS * PLATE_COLS}], got {wells_per_plate}")
        if not 1 <= sites_per_well <= 99:
            raise ConfigError(f"synthetic sites_per_well must be in [1, 99], got {sites_per_well}")
        self.n_fields, self.size, self.seed = int(n_fields), int(size), int(seed)
        self.n_plates, self.wells_per_plate = int(n_plates), int(wells_per_plate)
        self.sites_per_well, self.n_classes = int(sites_per_well), int(n_classes)

    @classmethod
    def from_config(cls, cfg: SyntheticConfig) -> SyntheticCellPainting:
        """Build from the ``data.synthetic`` config section."""
        return cls(n_fields=cfg.n_fields, size=cfg.size, seed=cfg.seed, n_plates=cfg.n_plates,
                   wells_per_plate=cfg.wells_per_plate, sites_per_well=cfg.sites_per_well,
                   n_classes=cfg.n_classes)

    def __len__(self) -> int:
        return self.n_fields

    def __repr__(self) -> str:
        return (f"SyntheticCellPainting(n_fields={self.n_fields}, size={self.size}, seed={self.seed}, "
                f"n_plates={self.n_plates}, wells_per_plate={self.wells_per_plate}, "
                f"sites_per_well={self.sites_per_well}, n_classes={self.n_classes})")

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n_fields:
            raise IndexError(f"field index {i} out of range [0, {self.n_fields})")
        return i

    def layout(self, i: int) -> tuple[int, int, int]:
        """0-based (plate, well, site) of field ``i``: sites fastest, then plates, then wells."""
        i = self._check(i)
        site, j = i % self.sites_per_well, i // self.sites_per_well
        plate_in_group, k = j % self.n_plates, j // self.n_plates
        well, group = k % self.wells_per_plate, k // self.wells_per_plate
        return group * self.n_plates + plate_in_group, well, site

    def label(self, i: int) -> int:
        """Phenotype class of field ``i`` (0 = control), without rendering."""
        return self.layout(i)[1] % self.n_classes

    def labels(self) -> np.ndarray:
        """Labels of all fields, (n_fields,) int64."""
        idx = np.arange(self.n_fields)
        well = (idx // (self.sites_per_well * self.n_plates)) % self.wells_per_plate
        return (well % self.n_classes).astype(np.int64)

    def metadata(self, i: int) -> dict[str, Any]:
        """Plate/well/site/label metadata of field ``i`` (no rendering)."""
        plate, well, site = self.layout(i)
        label = well % self.n_classes
        row, col = well_position(well)
        return {
            "Metadata_Plate": f"SYNTH-P{plate + 1:02d}",
            "Metadata_Well": _well_name(row, col),
            "Metadata_Site": site + 1,
            "Metadata_Label": label_name(label),
            "Metadata_Phenotype": PHENOTYPES[label].name,
            "Metadata_Control": label == 0,
            "label": label,
            "index": i,
            "row": row,
            "col": col,
        }

    def plate_gain(self, plate: int) -> np.ndarray:
        """Per-channel intensity factor of a plate (batch effect), from ``(seed, plate)`` only."""
        rng = np.random.default_rng([self.seed, plate, 7])
        return np.exp(rng.normal(0.0, 0.08, 5)).astype(np.float32)

    def field(self, i: int) -> np.ndarray:
        """Render field ``i``: (5, size, size) uint16 in :data:`SYNTH_CHANNELS` order."""
        plate, well, _ = self.layout(i)
        rng = np.random.default_rng([self.seed, int(i)])
        return render_field(rng, self.size, PHENOTYPES[well % self.n_classes], self.plate_gain(plate))

    def field_and_masks(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Field ``i`` (identical to :meth:`field`) plus its exact ``nuclei`` and ``cells`` instance labels."""
        plate, well, _ = self.layout(i)
        rng = np.random.default_rng([self.seed, int(i)])
        out = render_field(rng, self.size, PHENOTYPES[well % self.n_classes], self.plate_gain(plate),
                           with_masks=True)
        assert isinstance(out, tuple)
        return out
