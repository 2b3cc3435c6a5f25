"""Profile tables: ``Metadata_*`` columns + ``Cells_dinocell_<i>`` features, atomic Parquet writing.

The layout pycytominer and copairs expect (and :mod:`dinocell.evaluate.profiling` reads): metadata
columns first (plate, well, site, then the rest sorted), then the features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinocell.errors import UserError
from dinocell.evaluate.profiling import feature_columns, feature_name, metadata_columns
from dinocell.paths import write_atomic
from dinocell.provenance import provenance

#: Parquet schema-metadata key of the code that made a profile table (JSON of dinocell.provenance.provenance)
PROVENANCE_KEY = b"dinocell"

DTYPES = {"fp32": np.float32, "float32": np.float32, "fp16": np.float16, "float16": np.float16}


#: Integer bookkeeping columns of a profile row (kept as integers, not metadata strings).
INDEX_COLUMNS = ("Metadata_FieldIndex", "Metadata_PatchIndex")


def profiles_frame(metas: Sequence[dict[str, Any]], vectors: np.ndarray) -> pd.DataFrame:
    """Profile rows as pycytominer reads them: ``Metadata_*`` columns from
    :func:`~dinocell.evaluate.profiling.metadata_columns` (plate, well, site, ``pert_type``,
    ``JCP2022`` when known, the rest sorted), the integer field/patch indices, then the features
    ``Cells_dinocell_<i>`` (:func:`~dinocell.evaluate.profiling.feature_name`)."""
    meta = metadata_columns([{k: v for k, v in m.items() if k not in INDEX_COLUMNS} for m in metas])
    for c in INDEX_COLUMNS:
        if any(c in m for m in metas):
            meta[c] = np.asarray([int(m.get(c, -1)) for m in metas], dtype=np.int64)
    vectors = np.asarray(vectors, dtype=np.float32)
    feats = pd.DataFrame(vectors, columns=[feature_name(i) for i in range(vectors.shape[1])])
    return pd.concat([meta.reset_index(drop=True), feats], axis=1)


def write_profiles(df: pd.DataFrame, path: str | os.PathLike[str], dtype: str = "fp32") -> Path:
    """Write a profile table as Parquet (features in fp16/fp32) atomically.

    The file's schema metadata also says which code made it (:data:`PROVENANCE_KEY`: the JSON of
    :func:`dinocell.provenance.provenance`), beside pandas' own key: the columns and what
    ``pd.read_parquet`` / pycytominer read are unchanged, yet a profile copied away from its run folder
    still names its dinocell version and commit (:func:`profile_provenance`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose fp32 or fp16")
    out = Path(path)
    feat_cols = feature_columns(df)
    frame = df.copy()
    frame[feat_cols] = frame[feat_cols].astype(DTYPES[dtype])
    table = pa.Table.from_pandas(frame, preserve_index=False)  # what DataFrame.to_parquet(index=False) writes
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           PROVENANCE_KEY: json.dumps(provenance(), sort_keys=True).encode()})
    return write_atomic(out, lambda tmp: pq.write_table(table, str(tmp)))


def profile_provenance(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The ``{"dinocell_version", "git_commit"}`` a profile Parquet file records, or None (older files)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None


__all__ = ["DTYPES", "INDEX_COLUMNS", "PROVENANCE_KEY", "profile_provenance", "profiles_frame", "write_profiles"]
