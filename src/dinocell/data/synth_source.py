"""The built-in synthetic Cell Painting source (the offline default, ``data.source: synthetic``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dinocell.data.field import FieldRecord, FieldSource, select_channels
from dinocell.data.registry import register_source
from dinocell.data.synthetic import SYNTH_CHANNELS, SyntheticCellPainting


class SyntheticSource(FieldSource):
    """Synthetic fields rendered on the fly; records carry the generator index and phenotype label."""

    name = "synthetic"

    def __init__(self, data_cfg: Any) -> None:
        super().__init__(data_cfg.scaling, data_cfg.stain)
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


register_source("synthetic", lambda uri: uri == "synthetic", lambda uri, cfg: SyntheticSource(cfg), priority=0)
