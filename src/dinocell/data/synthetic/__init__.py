"""Synthetic Cell Painting: the in-memory generator (:mod:`.generator`) and the JUMP-layout folder
writer (:mod:`.folder`)."""

from __future__ import annotations

from dinocell.data.synthetic.folder import TIMESTAMP, mask_file_name, write_jump_folder
from dinocell.data.synthetic.generator import (
    MASK_OBJECTS,
    MAX_CLASSES,
    NOMINAL_SIZE,
    PHENOTYPES,
    PLATE_COLS,
    PLATE_ROWS,
    SYNTH_CHANNELS,
    Phenotype,
    SyntheticCellPainting,
    instance_masks,
    label_name,
    render_field,
    well_position,
)

__all__ = [
    "MASK_OBJECTS", "MAX_CLASSES", "NOMINAL_SIZE", "PHENOTYPES", "PLATE_COLS", "PLATE_ROWS", "SYNTH_CHANNELS",
    "TIMESTAMP", "Phenotype", "SyntheticCellPainting", "instance_masks", "label_name", "mask_file_name",
    "render_field", "well_position", "write_jump_folder",
]
