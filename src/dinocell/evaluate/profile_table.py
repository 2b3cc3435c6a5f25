"""Profile tables: ``Metadata_*`` columns + ``emb_0..``, per-well means, atomic Parquet writing.

The layout pycytominer and copairs expect (and :mod:`dinocell.evaluate.profiling` reads): metadata
columns first (plate, well, site, then the rest sorted), then the features.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinocell.errors import DataError, UserError

DTYPES = {"fp32": np.float32, "float32": np.float32, "fp16": np.float16, "float16": np.float16}



def profiles_frame(metas: Sequence[dict[str, Any]], vectors: np.ndarray) -> pd.DataFrame:
    """``Metadata_*`` columns (sorted, plate/well/site first) + ``emb_0..emb_{K-1}``."""
    meta = pd.DataFrame(list(metas))
    first = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site") if c in meta.columns]
    meta = meta[first + sorted(c for c in meta.columns if c not in first)]
    feats = pd.DataFrame(np.asarray(vectors, dtype=np.float32),
                         columns=[f"emb_{i}" for i in range(vectors.shape[1])])
    return pd.concat([meta.reset_index(drop=True), feats], axis=1)


def aggregate_wells(fields: pd.DataFrame) -> pd.DataFrame:
    """Mean profile per (plate, well); metadata constant within a well is kept, ``Metadata_Count`` added."""
    feat_cols = [c for c in fields.columns if c.startswith("emb_")]
    meta_cols = [c for c in fields.columns if c.startswith("Metadata_")]
    keys = [c for c in ("Metadata_Plate", "Metadata_Well") if c in fields.columns]
    if not keys:
        raise DataError("per-well profiles need Metadata_Plate/Metadata_Well columns")
    grouped = fields.groupby(keys, sort=True, dropna=False)
    constant = [c for c in meta_cols if c not in keys and (grouped[c].nunique(dropna=False) <= 1).all()]
    meta = grouped[constant].first() if constant else grouped.size().to_frame().iloc[:, :0]
    meta["Metadata_Count"] = grouped.size()
    feats = grouped[feat_cols].mean()
    out = pd.concat([meta, feats], axis=1).reset_index()
    return out[keys + [c for c in out.columns if c.startswith("Metadata_") and c not in keys] + feat_cols]


def write_profiles(df: pd.DataFrame, path: str | os.PathLike[str], dtype: str = "fp32") -> Path:
    """Write a profile table as Parquet (features in fp16/fp32) atomically."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose fp32 or fp16")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    feat_cols = [c for c in df.columns if c.startswith("emb_")]
    table = df.copy()
    table[feat_cols] = table[feat_cols].astype(DTYPES[dtype])
    tmp = out.with_name(out.name + ".tmp")
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


__all__ = ["DTYPES", "aggregate_wells", "profiles_frame", "write_profiles"]
