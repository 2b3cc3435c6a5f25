"""``dinocell check``: progress, gaps, failures, timing, storage and (optionally) deep verification.

Why a separate checker: on a cluster thousands of volumes finish, fail or get preempted
independently.  This reads only the output folder (metadata JSONs, zarr.json files, chunk counts,
``logs/*.err``), so it is safe to run while extraction is still going, and ``--verify`` re-reads
chunks to catch what metadata cannot: corrupt or missing chunks, NaN/Inf features, bad masks.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.errors import DataError
from dinocell.extract.volumes.config import ARRAYS, require_volumes
from dinocell.extract.volumes.store import quick_verify, read_metadata, volume_paths

_NAME = re.compile(r"^volume_(\d{6,})_(features\.zarr|gt\.zarr|mask\.zarr|metadata\.json)$")
_ERR = re.compile(r"^volume_(\d{6,})\.err$")


def _ranges(indices: Sequence[int]) -> str:
    """Compact "0-3,7,9-10" form for human output."""
    out: list[str] = []
    s = sorted(indices)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        out.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(out)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {"count": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values), "total": float(sum(values))}


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "unreadable error log"
    return lines[-1] if lines else "empty error log"


def scan_output(output_dir: str | os.PathLike[str]) -> dict[str, set[int]]:
    """Indices seen in the folder: with metadata, with any array, with an error log."""
    out = Path(output_dir)
    seen: dict[str, set[int]] = {"metadata": set(), "arrays": set(), "errors": set()}
    if not out.is_dir():
        return seen
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m:
            seen["metadata" if m.group(2) == "metadata.json" else "arrays"].add(int(m.group(1)))
    logs = out / "logs"
    if logs.is_dir():
        for p in logs.iterdir():
            m = _ERR.match(p.name)
            if m:
                seen["errors"].add(int(m.group(1)))
    return seen


# --------------------------------------------------------------------------------------------------
# Deep verification
# --------------------------------------------------------------------------------------------------


def verify_volume(output_dir: str | os.PathLike[str], index: int, max_in_flight: int = 8) -> list[str]:
    """Read every chunk of a volume's arrays and list the problems (empty list = healthy).

    Works for both stores (patch / voxel).  Checks: metadata and zarr.json agree (shape, dtype, chunk
    count), the feature grid matches the array shapes, every chunk decodes (a
    corrupt or truncated chunk fails zstd/blosc/crc32c decoding or its size check), features are
    finite, the mask holds only 0/1 and ground truth is zero outside the mask.
    """
    import tensorstore as ts

    meta = read_metadata(output_dir, index)
    problems = quick_verify(output_dir, index, meta)
    if meta is None:
        return problems
    paths = volume_paths(output_dir, index)
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    stores: dict[str, Any] = {}
    for name in ARRAYS:
        try:
            stores[name] = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(paths[name])}},
                                   read=True, context=ctx).result()
        except Exception as e:
            problems.append(f"{name}: cannot open ({str(e).splitlines()[0]})")
            continue
        st = stores[name]
        if list(st.shape) != list(meta["shapes"][name]):
            problems.append(f"{name}: shape {list(st.shape)} != metadata {meta['shapes'][name]}")
        if st.dtype.name != meta["dtypes"][name]:
            problems.append(f"{name}: dtype {st.dtype.name} != metadata {meta['dtypes'][name]}")
    mask_arr = None
    for name, st in stores.items():
        chunk = list(st.chunk_layout.read_chunk.shape)
        starts = [range(0, int(s), int(c)) for s, c in zip(st.shape, chunk, strict=True)]
        boxes = [tuple(slice(o, min(o + c, int(s))) for o, c, s in zip(origin, chunk, st.shape, strict=True))
                 for origin in itertools.product(*starts)]
        bad_values = 0
        for start in range(0, len(boxes), max_in_flight):
            batch = boxes[start:start + max_in_flight]
            futures = [st[b].read() for b in batch]
            for box, fut in zip(batch, futures, strict=True):
                where = "(" + ", ".join(str(s.start) for s in box) + ")"
                try:
                    data = fut.result()
                except Exception as e:
                    problems.append(f"{name}: chunk at {where} unreadable: {str(e).splitlines()[0]}")
                    continue
                if name == "features":
                    bad_values += int(data.size - np.count_nonzero(np.isfinite(data)))
                elif name == "mask":
                    if data.size and int(data.max()) > 1:
                        problems.append(f"{name}: chunk at {where} holds values other than 0/1")
        if bad_values:
            problems.append(f"features: {bad_values} NaN/Inf values")
        if name == "mask" and not any(p.startswith("mask: chunk") for p in problems):
            try:
                mask_arr = st.read().result()
            except Exception:
                mask_arr = None
    if mask_arr is not None and "gt" in stores and not any(p.startswith("gt: chunk") for p in problems):
        try:
            gt = stores["gt"].read().result()
            if gt.size and np.any((gt > 0) & (mask_arr == 0)):
                problems.append("gt: labels outside the valid mask")
        except Exception as e:
            problems.append(f"gt: unreadable ({str(e).splitlines()[0]})")
    return problems


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def check_output(output_dir: str | os.PathLike[str], verify: bool = False, sample_size: int | None = None,
                 verify_indices: Sequence[int] | None = None, seed: int = 0) -> dict[str, Any]:
    """Everything ``dinocell check`` reports, as a JSON-ready dict (``ok`` is the overall verdict)."""
    out = Path(output_dir)
    if not out.is_dir():
        raise DataError(f"output directory not found: {out}")
    seen = scan_output(out)
    try:
        record = json.loads((out / "extraction_run.json").read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    requested = set(int(i) for i in record.get("requested", []))

    completed: list[int] = []
    incomplete: dict[int, list[str]] = {}
    metas: dict[int, dict[str, Any]] = {}
    for i in sorted(seen["metadata"]):
        meta = read_metadata(out, i)
        problems = quick_verify(out, i, meta)
        if problems:
            incomplete[i] = problems
        else:
            completed.append(i)
            metas[i] = meta  # type: ignore[assignment]
    for i in sorted(seen["arrays"] - seen["metadata"]):
        incomplete[i] = ["arrays present but no metadata (interrupted or running)"]
    done = set(completed)
    failed = {i: _last_line(volume_paths(out, i)["error"]) for i in sorted(seen["errors"] - done)}

    # Missing: requested (by any run) but not complete; without a run record, every index up to
    # the largest seen.  Gaps: holes between the smallest and largest completed index (informational).
    everything = requested | done | set(incomplete) | set(failed)
    expected = requested if requested else (set(range(0, max(everything) + 1)) if everything else set())
    missing = sorted(expected - done)
    gaps = sorted(set(range(min(done), max(done) + 1)) - done) if done else []

    timing_keys = ("sampling_seconds", "extraction_seconds", "write_seconds", "total_seconds")
    timing = {k: _stats([float(m["timing"][k]) for m in metas.values() if k in m.get("timing", {})])
              for k in timing_keys}
    per_array = {name: float(sum(m.get("storage", {}).get(f"{name}_gb", 0.0) for m in metas.values()))
                 for name in ARRAYS}
    totals = [float(m.get("storage", {}).get("total_gb", 0.0)) for m in metas.values()]
    storage = {"total_gb": float(sum(totals)), "per_volume_gb": _stats(totals), "per_array_gb": per_array}
    sources = Counter(str(m.get("source", {}).get("dataset", "")) for m in metas.values())
    entries = Counter(str(m.get("source", {}).get("entry_name", "")) for m in metas.values())
    configs: dict[str, dict[str, Any]] = {}
    for m in metas.values():
        c = dict(m.get("configuration", {}))
        model = c.get("model", {})
        key_cfg = {"model": {k: model.get(k) for k in ("source", "path", "name", "embed_dim", "patch_size")},
                   "store": m.get("store", "voxel"),
                   **{k: c.get(k) for k in ("resolution_nm", "output_image_dim", "axes", "compression",
                                            "chunks", "feature_dtype")}}
        key = json.dumps(key_cfg, sort_keys=True)
        configs.setdefault(key, {"configuration": key_cfg, "volumes": 0})["volumes"] += 1
    gt_frac = [float(m.get("statistics", {}).get("valid_gt_fraction", 0.0)) for m in metas.values()]
    classes = sorted({c for m in metas.values() for c in m.get("statistics", {}).get("classes", [])})

    report: dict[str, Any] = {
        "output_dir": str(out.absolute()),
        "completed": len(completed),
        "completed_indices": completed,
        "requested": len(requested) if requested else None,
        "missing": len(missing),
        "missing_indices": missing,
        "gaps": gaps,
        "incomplete": {str(i): p for i, p in incomplete.items()},
        "failed": {str(i): line for i, line in failed.items()},
        "timing": timing,
        "storage": storage,
        "sources": dict(sources),
        "entries": dict(entries),
        "configurations": list(configs.values()),
        "statistics": {"classes": classes, "valid_gt_fraction": _stats(gt_frac)},
        "verify": None,
    }
    if verify:
        require_volumes(("tensorstore",), "check --verify")
        if verify_indices:
            chosen = [int(i) for i in verify_indices]
        elif sample_size is not None and sample_size < len(completed):
            rng = np.random.default_rng(seed)
            chosen = sorted(int(i) for i in rng.choice(completed, size=max(sample_size, 0), replace=False))
        else:
            chosen = list(completed)
        results = {}
        for i in chosen:
            if i not in done:
                results[str(i)] = ["not complete (no valid metadata)"]
                continue
            probs = verify_volume(out, i)
            if probs:
                results[str(i)] = probs
        report["verify"] = {"checked": chosen, "problems": results, "ok": not results}
    report["ok"] = (not missing and not incomplete and not failed
                    and (report["verify"] is None or report["verify"]["ok"]))
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of :func:`check_output`."""
    lines = [f"output: {report['output_dir']}"]
    req = f" of {report['requested']} requested" if report.get("requested") else ""
    lines.append(f"completed: {report['completed']}{req}  [{_ranges(report['completed_indices'])}]")
    if report["missing_indices"]:
        lines.append(f"missing: {report['missing']}  [{_ranges(report['missing_indices'])}]")
    else:
        lines.append("missing: 0")
    lines.append(f"gaps in the completed range: [{_ranges(report['gaps'])}]" if report["gaps"]
                 else "gaps in the completed range: none")
    for i, probs in report["incomplete"].items():
        lines.append(f"incomplete volume {i}: {'; '.join(probs)}")
    for i, line in report["failed"].items():
        lines.append(f"failed volume {i}: {line}")
    t = report["timing"]
    if t["total_seconds"].get("count"):
        lines.append("timing (s): " + ", ".join(
            f"{k.replace('_seconds', '')} mean {v['mean']:.2f} / max {v['max']:.2f}"
            for k, v in t.items() if v.get("count")))
    s = report["storage"]
    pv = s["per_volume_gb"]
    lines.append(f"storage: {s['total_gb']:.4f} GB total"
                 + (f", {pv['mean']:.4f} GB per volume" if pv.get("count") else "")
                 + " (" + ", ".join(f"{k} {v:.4f} GB" for k, v in s["per_array_gb"].items()) + ")")
    if report["sources"]:
        lines.append("sources: " + ", ".join(f"{k or '?'} x{v}" for k, v in report["sources"].items()))
    for c in report["configurations"]:
        cfg = c["configuration"]
        lines.append(f"configuration x{c['volumes']}: model {cfg['model'].get('name')} "
                     f"({cfg['model'].get('source')}), resolution {cfg.get('resolution_nm')} nm, dim "
                     f"{cfg.get('output_image_dim')}, axes {cfg.get('axes')}, {cfg.get('store')} store, {cfg.get('compression')}, "
                     f"chunks {cfg.get('chunks')}")
    v = report.get("verify")
    if v is not None:
        lines.append(f"verify: {len(v['checked'])} volume(s) read, "
                     + ("all healthy" if v["ok"] else f"{len(v['problems'])} with problems"))
        for i, probs in v["problems"].items():
            for p in probs:
                lines.append(f"  volume {i}: {p}")
    lines.append("status: OK" if report["ok"] else "status: PROBLEMS")
    return "\n".join(lines)
