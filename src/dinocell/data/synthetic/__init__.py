"""Synthetic Cell Painting: one field rendered from a phenotype (:mod:`.render`), the dataset that
lays fields out on plates and wells (:mod:`.generator`), and the JUMP-layout folder writer (:mod:`.folder`)."""

from __future__ import annotations

from dinocell.data.synthetic.folder import TIMESTAMP, mask_file_name, write_jump_folder
from dinocell.data.synthetic.generator import (
    PLATE_COLS,
    PLATE_ROWS,
    SyntheticCellPainting,
    label_name,
    well_position,
)
from dinocell.data.synthetic.render import (
    MASK_OBJECTS,
    MAX_CLASSES,
    NOMINAL_SIZE,
    PHENOTYPES,
    SYNTH_CHANNELS,
    Phenotype,
    instance_masks,
    render_field,
)

__all__ = [
    "MASK_OBJECTS", "MAX_CLASSES", "NOMINAL_SIZE", "PHENOTYPES", "PLATE_COLS", "PLATE_ROWS", "SYNTH_CHANNELS",
    "TIMESTAMP", "Phenotype", "SyntheticCellPainting", "instance_masks", "label_name", "mask_file_name",
    "render_field", "well_position", "write_jump_folder",
]
