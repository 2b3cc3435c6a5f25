"""Profiles the way image-based profiling scientists use them: pycytominer, then copairs mAP.

The pipeline is JUMP's (Chandrasekaran et al. 2024, "Three million images and morphological profiles
of cells treated with matched chemical and genetic perturbations", Nat. Methods):

1. **Aggregate** field profiles to wells by the median (``pycytominer.aggregate``).
2. **Normalise** each plate against its negative controls (``pycytominer.normalize``,
   ``mad_robustize``: (x - median) / MAD of the plate's ``Metadata_pert_type == "negcon"`` wells);
   a plate without negcons falls back to all of its wells, with a warning.  Optionally sphere
   (``spherize``, ZCA on the negcons) to remove correlated nuisance directions.
3. **Score** with copairs (Kalinin et al. 2025, "A versatile information retrieval framework for
   evaluating profile strength and similarity", Nat. Commun.): average precision of each profile's
   replicates (same perturbation, another well, on any plate) in the cosine ranking, then mAP per
   perturbation with a permutation p-value, BH-corrected; *fraction retrieved* = share with p < 0.05.
   Two rankings, as JUMP reports them: against the same plate's negcons (``negcon``, "phenotypic
   activity") and against the other perturbations (``nonrep``, replicate retrieval).

Feature columns are named ``Cells_dinocell_<i>`` (:func:`feature_name`) so pycytominer's default
inference (``Cells_`` / ``Nuclei_`` / ``Cytoplasm_`` prefixes) finds them; tables with the older
``emb_<i>`` columns are still read.  The perturbation is ``Metadata_JCP2022`` (JUMP) or, without it,
``Metadata_Label``; negcons are ``Metadata_pert_type == "negcon"``, else ``Metadata_Control`` true,
else ``Metadata_Label == "control"``.

Normalisation also guards the score: it removes the component all profiles share.  Without it a
collapsed or untrained model, whose embeddings are nearly identical, produces tied similarities, and
copairs ranks tied positives before tied negatives — a constant embedding would score mAP = 1.  After
normalisation such profiles are all-zero and :func:`replicate_map` refuses them.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinocell.errors import DataError

log = logging.getLogger(__name__)

FEATURE_PREFIX = "Cells_dinocell_"
LEGACY_PREFIX = "emb_"
NORMALIZATIONS = ("mad_robustize", "standardize", "robustize", "none")
#: JUMP's control compounds (Metadata_JCP2022), from the JUMP profiling recipe.
NEGCON_CODES = frozenset({"JCP2022_800001", "JCP2022_800002", "JCP2022_033924", "JCP2022_915131",
                          "JCP2022_915130", "JCP2022_915129", "JCP2022_915128"})
POSCON_CODES = frozenset({"JCP2022_012818", "JCP2022_050797", "JCP2022_064022", "JCP2022_035095",
                          "JCP2022_046054", "JCP2022_025848", "JCP2022_037716", "JCP2022_085227",
                          "JCP2022_805264", "JCP2022_915132"})
_TRUE = {"true", "1", "yes", "y", "t"}
_WELL_KEY = "Metadata_WellKey"
_IS_NEGCON = "Metadata_IsNegcon"
_REF = "Metadata_dinocell_reference"


# --------------------------------------------------------------------------------------------------
# Tables and metadata
# --------------------------------------------------------------------------------------------------


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


def feature_name(i: int) -> str:
    """The name of feature ``i`` in a profile table (pycytominer infers ``Cells_*`` columns)."""
    return f"{FEATURE_PREFIX}{i}"


def feature_columns(df: pd.DataFrame) -> list[str]:
    """The ``Cells_dinocell_<i>`` (else legacy ``emb_<i>``) columns in numeric order."""
    for prefix in (FEATURE_PREFIX, LEGACY_PREFIX):
        cols = [c for c in df.columns if c.startswith(prefix) and c[len(prefix):].isdigit()]
        if cols:
            return sorted(cols, key=lambda c: int(c[len(prefix):]))
    return []


def _truthy(col: pd.Series) -> np.ndarray:
    if col.dtype == bool:
        return col.to_numpy()
    return col.astype(str).str.strip().str.lower().isin(_TRUE).to_numpy()


def pert_types(meta: pd.DataFrame) -> pd.Series:
    """``negcon`` / ``poscon`` / ``trt`` per row: ``Metadata_pert_type`` if present, else from the JUMP
    control codes, ``Metadata_Control`` or a ``control`` label."""
    if "Metadata_pert_type" in meta.columns:
        return meta["Metadata_pert_type"].astype(str).str.strip().str.lower()
    out = pd.Series("trt", index=meta.index, dtype=object)
    if "Metadata_JCP2022" in meta.columns:
        code = meta["Metadata_JCP2022"].astype(str)
        out[code.isin(POSCON_CODES)] = "poscon"
        out[code.isin(NEGCON_CODES)] = "negcon"
    elif "Metadata_Control" in meta.columns:
        out[_truthy(meta["Metadata_Control"])] = "negcon"
    elif "Metadata_Label" in meta.columns:
        out[meta["Metadata_Label"].astype(str).str.strip().str.lower().eq("control").to_numpy()] = "negcon"
    return out


def negcon_mask(meta: pd.DataFrame) -> np.ndarray:
    """True for negative-control rows (see :func:`pert_types`)."""
    return pert_types(meta).eq("negcon").to_numpy()


def perturbation_column(meta: pd.DataFrame) -> str:
    """``Metadata_JCP2022`` when present, else ``Metadata_Label``: what replicates share."""
    for c in ("Metadata_JCP2022", "Metadata_Label"):
        if c in meta.columns:
            return c
    raise DataError("profiles have no Metadata_JCP2022 or Metadata_Label column (needed to define replicates)")


def _well(name: str) -> str:
    """``A1`` -> ``A01`` (load_data tables write both)."""
    letters = name.rstrip("0123456789")
    digits = name[len(letters):]
    return f"{letters.upper()}{int(digits):02d}" if letters and digits else name


def metadata_columns(rows: Iterable[Mapping[str, Any]], annotations: pd.DataFrame | None = None) -> pd.DataFrame:
    """``Metadata_Plate/Well/Site/pert_type`` (+ ``Metadata_JCP2022`` when known) for profile rows.

    ``rows`` are load_data rows or field-record metadata (``Metadata_*`` keys; others are dropped).
    ``annotations`` is a per-well table (JUMP's ``well.csv``: ``Metadata_Plate``, ``Metadata_Well``,
    ``Metadata_JCP2022`` ...) joined on plate and well.  ``Metadata_pert_type`` is derived where
    missing (:func:`pert_types`).
    """
    meta = pd.DataFrame([{k: v for k, v in r.items() if str(k).startswith("Metadata_")} for r in rows])
    for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site"):
        if c not in meta.columns:
            raise DataError(f"profile rows have no {c}")
    meta = meta.astype(str)
    meta["Metadata_Well"] = meta["Metadata_Well"].map(_well)
    if annotations is not None:
        ann = annotations.astype(str).copy()
        missing = {"Metadata_Plate", "Metadata_Well"} - set(ann.columns)
        if missing:
            raise DataError(f"annotation table lacks {', '.join(sorted(missing))}")
        ann["Metadata_Well"] = ann["Metadata_Well"].map(_well)
        extra = [c for c in ann.columns if c.startswith("Metadata_") and c not in meta.columns
                 or c in ("Metadata_Plate", "Metadata_Well")]
        meta = meta.merge(ann[extra].drop_duplicates(["Metadata_Plate", "Metadata_Well"]),
                          on=["Metadata_Plate", "Metadata_Well"], how="left")
    meta["Metadata_pert_type"] = pert_types(meta).to_numpy()
    first = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_pert_type"]
    first += ["Metadata_JCP2022"] if "Metadata_JCP2022" in meta.columns else []
    return meta[first + sorted(c for c in meta.columns if c not in first)]


# --------------------------------------------------------------------------------------------------
# pycytominer: aggregation and normalisation
# --------------------------------------------------------------------------------------------------


def aggregate_wells(fields: pd.DataFrame, operation: str = "median") -> pd.DataFrame:
    """Well profiles from field profiles (``pycytominer.aggregate``, median by default); metadata
    constant within a well is kept and ``Metadata_Count`` (fields per well) added."""
    aggregate = _pycytominer().aggregate
    feats = feature_columns(fields)
    keys = ["Metadata_Plate", "Metadata_Well"]
    if not feats or any(k not in fields.columns for k in keys):
        raise DataError("well aggregation needs Metadata_Plate, Metadata_Well and feature columns")
    wells = aggregate(fields, strata=keys, features=feats, operation=operation)
    meta_cols = [c for c in fields.columns if c.startswith("Metadata_") and c not in keys]
    grouped = fields.groupby(keys, sort=True)
    if meta_cols:
        constant = grouped[meta_cols].nunique(dropna=False).max() <= 1
        kept = [c for c in meta_cols if constant[c] and c != "Metadata_Site"]
        wells = wells.merge(grouped[kept].first().reset_index(), on=keys, how="left")
    wells = wells.merge(grouped.size().rename("Metadata_Count").reset_index(), on=keys, how="left")
    meta = [c for c in wells.columns if c.startswith("Metadata_")]
    return wells[meta + feats].reset_index(drop=True)


def _pycytominer() -> Any:
    """pycytominer, imported on first use (it is slow to import) and without its pandas-option warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pycytominer
    return pycytominer


def _reference_rows(plate_meta: pd.DataFrame) -> np.ndarray | None:
    ref = negcon_mask(plate_meta)
    return ref if ref.sum() >= 2 else None


def normalize_profiles(profiles: pd.DataFrame, method: str = "mad_robustize", spherize: bool = False) -> pd.DataFrame:
    """Per-plate ``pycytominer.normalize`` against the plate's negcons (all wells when a plate has
    fewer than two, with a warning); then optionally ``spherize`` on the negcons of all plates.

    Features without spread in a plate's reference become 0 on that plate: their scale is undefined,
    and dividing by pycytominer's epsilon would let them dominate every cosine.
    """
    normalize = _pycytominer().normalize
    if method not in NORMALIZATIONS:
        raise DataError(f"unknown normalisation '{method}'; choose one of {', '.join(NORMALIZATIONS)}")
    feats = feature_columns(profiles)
    if not feats:
        raise DataError(f"profiles have no feature columns ({FEATURE_PREFIX}0, ... or {LEGACY_PREFIX}0, ...)")
    df = profiles.reset_index(drop=True).astype({c: np.float64 for c in feats}).copy()  # one block, not D
    meta_cols = [c for c in df.columns if c not in feats]
    if method == "none" and not spherize:
        return df
    plates = df["Metadata_Plate"].astype(str) if "Metadata_Plate" in df.columns else pd.Series("", index=df.index)
    fallback: list[str] = []
    if method != "none":
        out = df.copy()
        for plate, idx in plates.groupby(plates).groups.items():
            part = df.loc[idx]
            ref = _reference_rows(part)
            if ref is None:
                fallback.append(str(plate))
                ref = np.ones(len(part), dtype=bool)
            part = part.assign(**{_REF: ref})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                normed = normalize(part, features=feats, meta_features=[*meta_cols, _REF],
                                   samples=f"{_REF} == True", method=method)
            values = normed[feats].to_numpy(dtype=np.float64, copy=True)
            ref_vals = part.loc[ref, feats].to_numpy(dtype=np.float64)
            values[:, np.ptp(ref_vals, axis=0) == 0] = 0.0
            out.loc[idx, feats] = values
        df = out
    if fallback:
        log.warning("no negcon wells on plate(s) %s: normalised against all wells of the plate instead",
                    ", ".join(sorted(fallback)))
    if spherize:
        ref = negcon_mask(df)
        if ref.sum() < 2:
            log.warning("fewer than 2 negcon profiles: sphering fitted on all profiles")
            ref = np.ones(len(df), dtype=bool)
        sph = normalize(df.assign(**{_REF: ref}), features=feats, meta_features=[*meta_cols, _REF],
                        samples=f"{_REF} == True", method="spherize")
        df[feats] = sph[feats].to_numpy(dtype=np.float64)
    return df


# --------------------------------------------------------------------------------------------------
# copairs: mAP
# --------------------------------------------------------------------------------------------------


def _score(meta: pd.DataFrame, feats: np.ndarray, pert: str, neg_diffby: list[str], neg_sameby: list[str],
           queries: np.ndarray, null_size: int, threshold: float, seed: int) -> dict[str, Any]:
    from copairs.map import average_precision, mean_average_precision

    try:
        ap = average_precision(meta, feats, [pert], [_WELL_KEY], neg_sameby, neg_diffby, progress_bar=False)
    except Exception as e:  # copairs.UnpairedException etc.: nothing to pair
        msg = str(e)
        if "positive" in msg:
            msg = f"no perturbation has replicate wells (same {pert}, different well)"
        raise DataError(f"copairs could not pair the profiles: {msg}") from None
    ap = ap[queries]
    ap = ap[(ap["n_pos_pairs"] > 0) & (ap["n_total_pairs"] > ap["n_pos_pairs"])]
    if ap.empty:
        raise DataError(f"no perturbation has replicate wells (same {pert}, different well) to retrieve")
    maps = mean_average_precision(ap, [pert], null_size=null_size, threshold=threshold, seed=seed,
                                  progress_bar=False)
    per_label = [
        {"label": str(r[pert]), "mAP": float(r["mean_average_precision"]), "p_value": float(r["p_value"]),
         "corrected_p_value": float(r["corrected_p_value"]), "retrieved": bool(r["below_corrected_p"])}
        for _, r in maps.iterrows()
    ]
    return {
        "mean_average_precision": float(maps["mean_average_precision"].mean()),
        "fraction_retrieved": float(maps["below_corrected_p"].mean()),
        "fraction_retrieved_uncorrected": float(maps["below_p"].mean()),
        "mean_average_precision_per_profile": float(ap["average_precision"].mean()),
        "n_labels": int(len(maps)),
        "per_label": per_label,
    }


def _numeric_features(profiles: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """``profiles`` with every feature column numeric; a text cell is one line naming column and value."""
    bad = [c for c in cols if not pd.api.types.is_numeric_dtype(profiles[c])]
    if not bad:
        return profiles
    out = profiles.copy()
    for c in bad:
        num = pd.to_numeric(out[c], errors="coerce")
        wrong = num.isna() & out[c].notna()
        if wrong.any():
            raise DataError(f"profile feature column {c} holds text ({out[c][wrong].iloc[0]!r} in row "
                            f"{int(np.flatnonzero(wrong.to_numpy())[0])}); features must be numbers")
        out[c] = num
    return out


def replicate_map(
    profiles: pd.DataFrame,
    label_col: str | None = None,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    same_plate_negatives: bool = True,
    normalize: str = "mad_robustize",
    spherize: bool = False,
) -> dict[str, Any]:
    """copairs mAP of a profile table, after :func:`normalize_profiles`.

    ``negcon``: each treated profile ranks its replicates (same perturbation, another well, any plate)
    among the negcons (of its plate if ``same_plate_negatives``, as JUMP).  ``nonrep``: negcons left
    out, each profile ranks its replicates among the other perturbations.  The top-level numbers are
    ``negcon``'s, or ``nonrep``'s when the table has no negcons (``metric`` says which).
    """
    feats_cols = feature_columns(profiles)
    if not feats_cols:
        raise DataError(f"profiles have no feature columns ({FEATURE_PREFIX}0, ... or {LEGACY_PREFIX}0, ...)")
    pert = label_col or perturbation_column(profiles)
    if pert not in profiles.columns:
        raise DataError(f"profiles have no '{pert}' column (needed to define replicates)")
    if "Metadata_Well" not in profiles.columns:
        # without wells every row would be its own "well": fields of one well would count as replicates
        raise DataError("profiles have no Metadata_Well column: replicates are other wells of the same "
                        "perturbation, so the wells must be known (use the table 'dinocell embed' wrote)")
    profiles = _numeric_features(profiles, feats_cols)
    if not np.isfinite(profiles[feats_cols].to_numpy(dtype=np.float64)).all():
        raise DataError("profiles contain NaN or infinite feature values")
    df = normalize_profiles(profiles, normalize, spherize)
    feats = df[feats_cols].to_numpy(dtype=np.float64)
    if (np.linalg.norm(feats, axis=1) == 0).any():
        raise DataError("some profiles are all-zero after normalisation: the features do not vary "
                        "(a collapsed model?); mAP would be meaningless")
    meta = df[[c for c in df.columns if c not in feats_cols]].copy()
    meta[pert] = meta[pert].astype(str)
    if "Metadata_Plate" not in meta.columns:
        meta["Metadata_Plate"] = ""
    meta[_WELL_KEY] = meta["Metadata_Plate"].astype(str) + "/" + (
        meta["Metadata_Well"].astype(str) if "Metadata_Well" in meta.columns else pd.Series(np.arange(len(meta)).astype(str)))
    negcon = negcon_mask(meta)
    if negcon.all():
        raise DataError("every profile is a negative control; nothing to retrieve")
    meta[_IS_NEGCON] = negcon
    neg_sameby = ["Metadata_Plate"] if same_plate_negatives else []
    res: dict[str, Any] = {"n_profiles": int(len(df)), "n_controls": int(negcon.sum()), "threshold": threshold,
                           "null_size": null_size, "normalize": normalize, "spherize": spherize,
                           "perturbation": pert}
    if negcon.any():
        # negcons get unique ids so they are never each other's replicates (JUMP's recipe does the same)
        m = meta.copy()
        m.loc[negcon, pert] = [f"negcon_{i}" for i in range(int(negcon.sum()))]
        res["negcon"] = _score(m, feats, pert, [_IS_NEGCON, pert], neg_sameby, ~negcon, null_size, threshold, seed)
    else:
        log.warning("no negative-control profiles: reporting replicate retrieval against other perturbations only")
    keep = ~negcon
    try:
        res["nonrep"] = _score(meta[keep].reset_index(drop=True), feats[keep], pert, [pert], neg_sameby,
                               np.ones(int(keep.sum()), dtype=bool), null_size, threshold, seed)
    except DataError as e:
        if "negcon" not in res:
            raise
        res["nonrep_error"] = str(e)
    res["metric"] = "negcon" if "negcon" in res else "nonrep"
    res.update({k: v for k, v in res[res["metric"]].items()})
    return res


__all__ = ["aggregate_wells", "feature_columns", "feature_name", "metadata_columns", "negcon_mask",
           "normalize_profiles", "pert_types", "perturbation_column", "read_profiles", "replicate_map"]
