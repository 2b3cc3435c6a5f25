"""``dinocell segment predict`` and ``evaluate``: label TIFFs + an object table, and AP per channel.

``predict`` writes, per field, ``OUT/masks/<plate>_<well>_s<site>_<objects>_masks.tif`` (uint16/32,
0 = background) and one ``OUT/<objects>.parquet`` of every object (:mod:`dinocell.segment.objects`),
staged and then published so that a killed run never mixes generations (:mod:`dinocell.segment.publish`).
``evaluate`` segments every annotated field once per fluorescent channel and once on their mean and
reports AP50, AP 0.5:0.95 and F1@0.5 per channel (:mod:`dinocell.segment.metrics`).  ``synthetic``
as the evaluation source means *held-out* synthetic fields: the run's generator with another seed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.data.field import IMAGE_SUFFIXES
from dinocell.data.sources import FieldSource, open_source
from dinocell.errors import DataError
from dinocell.evaluate.embed import HELD_OUT_SEED_OFFSET  # unseen synthetic fields, as `evaluate` uses
from dinocell.paths import write_atomic
from dinocell.segment.config import SegmentConfig
from dinocell.segment.data import MEAN, MaskFinder, input_plane, iter_annotated
from dinocell.segment.infer import segment_image
from dinocell.segment.metrics import match_counts, scores, sum_counts
from dinocell.segment.model import SegmentationNet
from dinocell.segment.postprocess import drop_border_objects, label_dtype
from dinocell.segment.publish import MASKS, begin, mask_suffix, publish

log = logging.getLogger(__name__)

class _ImageFileSource(FieldSource):
    """A single 2-D image file as a one-channel field (channel ``image``)."""

    def __init__(self, path: str, scaling: Any, stain: Any = None) -> None:
        from dinocell.data.field import FieldRecord

        super().__init__(scaling, stain)
        self.name, self.channels, self.fluorescent = path, ["image"], [True]
        self.records = [FieldRecord(plate=Path(path).stem, well="", site=1, channels={"image": path},
                                    metadata={"Metadata_Plate": Path(path).stem, "Metadata_Well": "",
                                              "Metadata_Site": "1", "Metadata_FileName": Path(path).name})]


def open_input(cfg: SegmentConfig, spec: str) -> FieldSource:
    """A source for ``spec``: one image file, or anything :func:`open_source` reads, finished by
    ``cfg.data`` (the run's, which carries the backbone's training scaling: ``segment.model.segmentation_model``)."""
    if spec.lower().endswith(IMAGE_SUFFIXES) and Path(spec).is_file():
        return _ImageFileSource(spec, cfg.data.scaling, cfg.data.stain)
    return open_source(cfg.data, spec)


def check_channel(source: FieldSource, channel: str) -> None:
    """Fail early (before any work) on a channel the source does not have."""
    if channel.lower() != MEAN and channel.lower() not in {c.lower() for c in source.channels}:
        raise DataError(f"unknown channel '{channel}'; {source.name} has {', '.join(source.channels)}, mean")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "field"


def _write_tiff(path: Path, labels: np.ndarray) -> None:
    import tifffile

    data = labels.astype(label_dtype(int(labels.max()) if labels.size else 0))
    write_atomic(path, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib"), unique=True)


def predict(net: SegmentationNet, cfg: SegmentConfig, inputs: list[str], out: str | os.PathLike[str],
            channel: str | None = None) -> dict[str, Any]:
    """Segment every field of every input; write label TIFFs and ``<objects>.parquet``; return counts."""
    import pandas as pd

    from dinocell.segment.objects import measure_objects

    channel = channel or cfg.task.channel
    sources = [open_input(cfg, spec) for spec in inputs]
    for s in sources:
        if not isinstance(s, _ImageFileSource):
            check_channel(s, channel)
    out_dir = Path(out)
    objects = cfg.task.objects
    stage = begin(out_dir, objects)  # nothing in OUT changes until every field is done
    tables, n_fields, n_objects = [], 0, 0
    try:
        for source in sources:
            which = "image" if isinstance(source, _ImageFileSource) else channel
            for rec in source.records:
                raw = source.load_raw(rec)
                planes = source.load(rec)
                labels = segment_image(net, input_plane(planes, source.channels, source.fluorescent, which), cfg)
                stem = _safe(f"{rec.plate}_{rec.well}_s{rec.site}" if rec.well else rec.plate)
                _write_tiff(stage / MASKS / f"{stem}{mask_suffix(objects)}", labels)
                meta = {"Metadata_Plate": rec.plate, "Metadata_Well": rec.well, "Metadata_Site": int(rec.site),
                        **{k: v for k, v in rec.metadata.items() if k.startswith("Metadata_")
                           and k not in ("Metadata_Plate", "Metadata_Well", "Metadata_Site")}}
                tables.append(measure_objects(labels, raw, source.channels, objects, meta))
                n_fields += 1
                n_objects += int(labels.max())
        table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        table_name = f"{objects}.parquet"
        # through the one writer like the TIFFs: a full disk is one DiskFullError line, not a pyarrow traceback
        write_atomic(stage / table_name, lambda tmp: table.to_parquet(tmp, index=False))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # the previous generation stays as it was
        raise
    publish(stage, out_dir, objects, table_name)
    return {"fields": n_fields, "objects": n_objects, "table": str(out_dir / table_name),
            "masks": str(out_dir / MASKS)}


def evaluation_source(cfg: SegmentConfig, data: str) -> FieldSource:
    """``synthetic`` -> held-out generator fields (another seed); anything else -> :func:`open_source`."""
    if data == "synthetic":
        syn = replace(cfg.data.synthetic, seed=cfg.data.synthetic.seed + HELD_OUT_SEED_OFFSET)
        return open_source(replace(cfg.data, synthetic=syn), "synthetic")
    return open_source(cfg.data, data)


def evaluate_net(net: SegmentationNet, cfg: SegmentConfig, source: FieldSource, spec: str,
                 channels: list[str] | None = None, limit: int | None = None) -> dict[str, Any]:
    """AP per channel (every fluorescent channel and ``mean`` unless ``channels`` is given)."""
    if channels is None:
        channels = [c for c, f in zip(source.channels, source.fluorescent, strict=True) if f] + [MEAN]
    for c in channels:
        check_channel(source, c)
    finder = MaskFinder.for_source(source, cfg.task.objects, spec)
    counts: dict[str, list[dict[float, tuple[int, int, int]]]] = {c: [] for c in channels}
    per_image = []
    for rec, planes, truth in iter_annotated(source, finder, limit):
        stack = np.stack([input_plane(planes, source.channels, source.fluorescent, c) for c in channels])
        preds = segment_image(net, stack, cfg)
        if cfg.task.drop_border_objects:  # the truth as the predictions: no object cut by the edge
            truth = drop_border_objects(truth)
        for c, pred in zip(channels, preds, strict=True):
            cnt = match_counts(truth, pred)
            counts[c].append(cnt)
            per_image.append({"field": rec.key, "channel": c, **scores(cnt)})
    n = len(per_image) // max(1, len(channels))
    return {"objects": cfg.task.objects, "train_channel": cfg.task.channel, "source": spec, "fields": n,
            "channels": {c: scores(sum_counts(v)) for c, v in counts.items()}, "per_image": per_image}


def evaluate(run_dir: str | os.PathLike[str], data: str, overrides: list[str] | None = None,
             limit: int | None = None) -> dict[str, Any]:
    """Load a ``segment fit`` run and evaluate it on ``data``."""
    from dinocell.segment.run import apply_overrides, load_segmenter

    net, cfg, _ = load_segmenter(run_dir)
    cfg = apply_overrides(net, cfg, list(overrides or []))
    return evaluate_net(net, cfg, evaluation_source(cfg, data), data, limit=limit)


def format_evaluation(res: dict[str, Any]) -> str:
    """Per-channel table of an :func:`evaluate_net` result."""
    lines = [f"objects: {res['objects']}   trained on: {res['train_channel']}   fields: {res['fields']}",
             f"{'channel':<10} {'AP50':>7} {'AP':>7} {'F1@0.5':>7} {'TP':>6} {'FP':>6} {'FN':>6}"]
    for c, s in res["channels"].items():
        mark = " *" if c.lower() == str(res["train_channel"]).lower() else ""
        lines.append(f"{c + mark:<10} {s['ap50']:>7.3f} {s['ap']:>7.3f} {s['f1_50']:>7.3f} "
                     f"{s['tp50']:>6d} {s['fp50']:>6d} {s['fn50']:>6d}")
    return "\n".join(lines)
