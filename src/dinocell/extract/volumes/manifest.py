"""The manifest: which raw and label arrays to extract from (YAML ``volumes:`` list or CSV).

Why a manifest instead of command-line URIs: a cluster job covers thousands of volume indices over
a handful of source volumes (index ``i`` uses entry ``i % len(manifest)``), each with per-class
label arrays, crops and resolutions that only a file can carry.  Relative paths are resolved
against the manifest's folder so a manifest travels with its data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinocell.errors import ConfigError


@dataclass
class VolumeEntry:
    """One input volume: a raw array, optional per-class label arrays and an optional crop (nm)."""

    name: str
    raw: str
    labels: dict[str, str] = field(default_factory=dict)
    crop: list[float] | None = None  # [z0, y0, x0, z1, y1, x1] in nm: where samples and GT live
    dataset: str = ""
    resolution: list[float] | None = None  # nm, for arrays that carry no scale (TIFF, plain arrays)
    label_offsets: dict[str, list[float]] = field(default_factory=dict)  # nm, same purpose


def _resolve_uri(uri: str, base: Path) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    return str((base / uri).resolve())


def _numbers(value: Any, n: int | None, what: str) -> list[float] | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if isinstance(value, str):
        value = [v for v in value.replace(";", " ").replace(",", " ").replace("[", " ").replace("]", " ").split()]
    if isinstance(value, (int, float)):
        value = [value]
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"manifest {what} must be numbers; got {value!r}") from None
    if n is not None and len(out) not in ((n, 1) if n == 3 else (n,)):
        raise ConfigError(f"manifest {what} needs {n} numbers; got {len(out)}")
    return out * 3 if (n == 3 and len(out) == 1) else out


def _entry(d: dict[str, Any], i: int, base: Path) -> VolumeEntry:
    if not isinstance(d, dict):
        raise ConfigError(f"manifest volume #{i} must be a mapping")
    if not d.get("raw"):
        raise ConfigError(f"manifest volume #{i} ({d.get('name', '?')}) has no 'raw' URI")
    labels = d.get("labels") or {}
    if isinstance(labels, str):  # "mito=uri;er=uri"
        pairs = [p for p in labels.split(";") if p.strip()]
        try:
            labels = dict(p.split("=", 1) for p in pairs)
        except ValueError:
            raise ConfigError(f"manifest volume #{i}: labels must look like 'mito=uri;er=uri'") from None
    for k, v in d.items():  # CSV style: label_<class> columns
        if k.startswith("label_") and k != "label_offsets" and isinstance(v, str) and v.strip():
            labels[k[len("label_"):]] = v
    if not isinstance(labels, dict):
        raise ConfigError(f"manifest volume #{i}: 'labels' must map class names to URIs")
    crop = _numbers(d.get("crop"), 6, f"volume #{i} crop")
    if crop is not None and not all(crop[k] < crop[k + 3] for k in range(3)):
        raise ConfigError(f"manifest volume #{i} crop must be [z0, y0, x0, z1, y1, x1] with z0<z1 ...")
    offsets = {str(k): _numbers(v, 3, f"volume #{i} label_offsets.{k}") or [0.0] * 3
               for k, v in (d.get("label_offsets") or {}).items()}
    return VolumeEntry(
        name=str(d.get("name") or f"volume_{i}"),
        raw=_resolve_uri(str(d["raw"]).strip(), base),
        labels={str(k).strip(): _resolve_uri(str(v).strip(), base) for k, v in labels.items()},
        crop=crop, dataset=str(d.get("dataset") or ""),
        resolution=_numbers(d.get("resolution"), 3, f"volume #{i} resolution"),
        label_offsets=offsets)


def load_manifest(path: str | os.PathLike[str]) -> list[VolumeEntry]:
    """Read a YAML (``volumes: [...]``) or CSV manifest; relative paths are relative to its folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"manifest not found: {p}")
    base = p.parent
    if p.suffix.lower() == ".csv":
        import pandas as pd

        try:
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        except Exception as e:
            raise ConfigError(f"manifest {p} is not a readable CSV: {e}") from None
        rows = df.to_dict("records")
    else:
        import yaml

        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError:
            raise ConfigError(f"manifest {p} is not valid YAML") from None
        rows = data.get("volumes") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ConfigError(f"manifest {p} must hold a list of volumes (top-level 'volumes:' key)")
    entries = [_entry(r, i, base) for i, r in enumerate(rows)]
    if not entries:
        raise ConfigError(f"manifest {p} lists no volumes")
    return entries
