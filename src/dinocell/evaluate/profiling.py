"""Profile quality with copairs: replicate retrieval mean average precision (mAP).

The question a profiling scientist asks of an embedding is "can I tell a treatment from the controls,
consistently across replicate wells?".  copairs (Kalinin et al. 2025, "A versatile information
retrieval framework for evaluating profile strength and similarity", Nat. Commun.) answers it with
average precision: each treated profile queries the others; its replicates (same ``Metadata_Label``,
another well) are the positives, the control wells are the negatives; AP is computed on the cosine
ranking and averaged per label (mAP).  A permutation null gives a p-value per label; the *fraction
retrieved* is the share of labels whose mAP is significant (BH-corrected p < 0.05, as in JUMP).

Profiles are Parquet/CSV tables with ``Metadata_*`` columns and ``emb_0..emb_{D-1}`` feature columns
(written by ``dinocell embed``).  Controls are rows with a true ``Metadata_Control`` or, without that
column, ``Metadata_Label == "control"``.

Normalisation matters: features are standardised per plate before cosine similarities are taken
(``normalize="standardize"``, as pycytominer's ``normalize``).  Besides removing plate effects, this
removes the component all profiles share.  Without it a collapsed or untrained model, whose
embeddings are nearly identical, produces tied similarities, and copairs ranks tied positives before
tied negatives (its ``lexsort`` keeps the positives-first input order) — a constant embedding would
score mAP = 1.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinocell.errors import DataError

log = logging.getLogger(__name__)

FEATURE_PREFIX = "emb_"
_REF_COL = "Metadata_Reference_Index"
_WELL_KEY = "Metadata_WellKey"
_TRUE = {"true", "1", "yes", "y", "t"}
NORMALIZATIONS = ("standardize", "center", "control", "none")


def read_profiles(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a profile table (.parquet / .csv / .csv.gz); one-line errors for missing/unreadable files."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"profiles file not found: {p}")
    try:
        if p.name.lower().endswith((".parquet", ".pq")):
            return pd.read_parquet(p)
        return pd.read_csv(p)
    except Exception as e:
        raise DataError(f"cannot read profiles {p}: {type(e).__name__}: {e}") from None


def feature_columns(df: pd.DataFrame) -> list[str]:
    """The ``emb_<i>`` columns in numeric order."""
    cols = [c for c in df.columns if c.startswith(FEATURE_PREFIX) and c[len(FEATURE_PREFIX):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(FEATURE_PREFIX):]))


def control_mask(meta: pd.DataFrame, label_col: str = "Metadata_Label") -> np.ndarray:
    """Control rows: ``Metadata_Control`` true, else ``label_col == "control"`` (case-insensitive)."""
    if "Metadata_Control" in meta.columns:
        col = meta["Metadata_Control"]
        if col.dtype == bool:
            return col.to_numpy()
        return col.astype(str).str.strip().str.lower().isin(_TRUE).to_numpy()
    if label_col in meta.columns:
        return meta[label_col].astype(str).str.strip().str.lower().eq("control").to_numpy()
    return np.zeros(len(meta), dtype=bool)


def normalize_features(feats: np.ndarray, plates: np.ndarray, controls: np.ndarray,
                       method: str = "standardize") -> np.ndarray:
    """Per-plate feature normalisation: ``standardize`` (z-score over the plate's profiles), ``center``
    (subtract the plate mean), ``control`` (z-score against the plate's controls) or ``none``.

    Features that are constant on a plate become 0 (they carry no information there).
    """
    if method not in NORMALIZATIONS:
        raise DataError(f"unknown normalisation '{method}'; choose one of {', '.join(NORMALIZATIONS)}")
    x = np.array(feats, dtype=np.float64)
    if method == "none":
        return x
    for plate in pd.unique(plates):
        rows = plates == plate
        ref = rows & controls if method == "control" else rows
        if method == "control" and ref.sum() < 2:
            raise DataError(f"plate {plate} has fewer than 2 control profiles; use normalize=standardize")
        mu = x[ref].mean(0)
        x[rows] -= mu
        if method in ("standardize", "control"):
            sd = x[ref].std(0)
            x[rows] = np.where(sd > 0, x[rows] / np.where(sd > 0, sd, 1.0), 0.0)
    return x


def replicate_map(
    profiles: pd.DataFrame,
    label_col: str = "Metadata_Label",
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    same_plate_negatives: bool = False,
    normalize: str = "standardize",
) -> dict[str, Any]:
    """Replicate-retrieval mAP of the treated labels against controls, with copairs.

    Positive pairs: same ``label_col``, different well (``Metadata_Plate`` + ``Metadata_Well``), both
    treated.  Negative pairs: a treated profile and a control (on the same plate if
    ``same_plate_negatives``).  Features are first normalised per plate (:func:`normalize_features`).
    Returns ``mean_average_precision`` (mean over labels),
    ``fraction_retrieved`` (BH-corrected p < threshold), ``fraction_retrieved_uncorrected`` and a
    per-label table.
    """
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import assign_reference_index

    feats_cols = feature_columns(profiles)
    if not feats_cols:
        raise DataError(f"profiles have no feature columns ({FEATURE_PREFIX}0, {FEATURE_PREFIX}1, ...)")
    if label_col not in profiles.columns:
        raise DataError(f"profiles have no '{label_col}' column (needed to define replicates)")
    meta = profiles[[c for c in profiles.columns if not c.startswith(FEATURE_PREFIX)]].reset_index(drop=True)
    meta = meta.copy()
    meta[label_col] = meta[label_col].astype(str)
    feats = profiles[feats_cols].to_numpy(dtype=np.float64)
    if not np.isfinite(feats).all():
        raise DataError("profiles contain NaN or infinite feature values")
    controls = control_mask(meta, label_col)
    if not controls.any():
        raise DataError("no control profiles (Metadata_Control true or Metadata_Label 'control') to compare to")
    if controls.all():
        raise DataError("every profile is a control; nothing to retrieve")
    plates = (meta["Metadata_Plate"].astype(str).to_numpy() if "Metadata_Plate" in meta.columns
              else np.zeros(len(meta), dtype=str))
    feats = normalize_features(feats, plates, controls, normalize)
    if (np.linalg.norm(feats, axis=1) == 0).any():
        raise DataError("some profiles are all-zero after normalisation: the features do not vary "
                        "(a collapsed model?); mAP would be meaningless")
    if "Metadata_Well" in meta.columns:
        plate = meta["Metadata_Plate"].astype(str) if "Metadata_Plate" in meta.columns else ""
        meta[_WELL_KEY] = plate + "/" + meta["Metadata_Well"].astype(str)
    else:
        meta[_WELL_KEY] = np.arange(len(meta)).astype(str)
    meta = assign_reference_index(meta, pd.Index(np.flatnonzero(controls)), reference_col=_REF_COL)

    pos_sameby = [label_col, _REF_COL]
    pos_diffby = [_WELL_KEY]
    neg_sameby = ["Metadata_Plate"] if same_plate_negatives and "Metadata_Plate" in meta.columns else []
    neg_diffby = [label_col, _REF_COL]
    try:
        ap = average_precision(meta, feats, pos_sameby, pos_diffby, neg_sameby, neg_diffby,
                               progress_bar=False)
    except Exception as e:  # copairs.UnpairedException etc.: no replicate wells / controls to pair
        msg = str(e)
        if "positive" in msg:
            msg = f"no treated label has replicate wells (same {label_col}, different well)"
        raise DataError(f"copairs could not pair the profiles: {msg}") from None
    ap = ap[~controls]
    ap = ap[ap["n_pos_pairs"] > 0]
    if ap.empty:
        raise DataError(f"no treated label has replicate wells (same {label_col}, different well)")
    maps = mean_average_precision(ap, [label_col], null_size=null_size, threshold=threshold, seed=seed,
                                  progress_bar=False)
    per_label = [
        {"label": str(r[label_col]), "mAP": float(r["mean_average_precision"]), "p_value": float(r["p_value"]),
         "corrected_p_value": float(r["corrected_p_value"]), "retrieved": bool(r["below_corrected_p"])}
        for _, r in maps.iterrows()
    ]
    return {
        "mean_average_precision": float(maps["mean_average_precision"].mean()),
        "fraction_retrieved": float(maps["below_corrected_p"].mean()),
        "fraction_retrieved_uncorrected": float(maps["below_p"].mean()),
        "mean_average_precision_per_profile": float(ap["average_precision"].mean()),
        "n_profiles": int(len(profiles)),
        "n_controls": int(controls.sum()),
        "n_labels": int(len(maps)),
        "threshold": threshold,
        "null_size": null_size,
        "normalize": normalize,
        "per_label": per_label,
    }


__all__ = ["control_mask", "feature_columns", "read_profiles", "replicate_map"]
