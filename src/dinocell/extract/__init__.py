"""Feature extraction: encoders, 3-D volume features in TensorStore, resumable runners, fast loaders."""

from __future__ import annotations

from typing import Any

__all__ = ["FeatureGrid", "FeatureVolumeDataset", "Upsample", "create_feature_dataloader", "encode_features"]


def __getattr__(name: str) -> Any:
    # lazy: importing the CLI must not pull in torch; nothing here imports tensorstore/dask (the
    # optional ``volumes`` extra) at module level
    if name in ("FeatureVolumeDataset", "create_feature_dataloader"):
        from dinocell.extract import dataset

        return getattr(dataset, name)
    if name == "Upsample":
        from dinocell.extract.upsample import Upsample

        return Upsample
    if name == "FeatureGrid":
        from dinocell.extract.volumes.store import FeatureGrid

        return FeatureGrid
    if name == "encode_features":
        from dinocell.models.encode import encode_features

        return encode_features
    raise AttributeError(name)
