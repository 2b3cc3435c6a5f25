"""benchmarks/bench_downstream.py helpers: designs, the pretraining cache, real fixtures, the classical
baseline, the field folders the segment library reads, and the picture."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import _downstream_data as dd  # noqa: E402
import _pretrain_cache as pc  # noqa: E402


def disks(shape: tuple[int, int], centres: list[tuple[int, int]], r: int) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    lab = np.zeros(shape, dtype=np.uint32)
    for i, (y, x) in enumerate(centres, start=1):
        lab[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = i
    return lab


def test_designs_by_name_and_by_override():
    d = pc.parse_design_args(["multiview", "single_view", "dense"],
                             ["dense:loss.dense_cross_weight=1.0", "dense:model.depth=2"])
    assert d["multiview"] == []
    assert "data.views.policy=single_view" in d["single_view"]
    assert d["dense"] == ["loss.dense_cross_weight=1.0", "model.depth=2"]
    assert list(pc.parse_design_args(["multiview"], ["x:a=1"])) == ["multiview", "x"]
    with pytest.raises(SystemExit, match="unknown design 'typo'"):
        pc.parse_design_args(["typo"], [])
    with pytest.raises(SystemExit, match="NAME:key=value"):
        pc.parse_design_args([], ["no_colon"])


def test_cache_key_changes_with_what_sets_the_weights(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  epochs: 1\n")
    k = pc.cache_key(["a=1"], 10, base)
    assert k == pc.cache_key(["a=1"], 10, base) and len(k) == 16
    assert len({k, pc.cache_key(["a=2"], 10, base), pc.cache_key(["a=1"], 11, base),
                pc.cache_key(["a=1"], None, base)}) == 4
    base.write_text("train:\n  epochs: 2\n")
    assert pc.cache_key(["a=1"], 10, base) != k


def test_cached_run_is_reused_without_training(tmp_path):
    """A finished run (marker written last) is returned as is: no pretraining is started."""
    key = pc.cache_key(["s=1", "a=1"], 5)
    run = tmp_path / key
    run.mkdir()
    (run / pc.MARKER).write_text(json.dumps({"design": "x"}))
    assert pc.pretrained_run("x", ["a=1"], 5, sizes=["s=1"], cache=tmp_path) == run


def test_median_diameter_and_classical_baseline_splits_touching_nuclei():
    from dinocell.segment.metrics import evaluate_pair

    truth = disks((96, 96), [(30, 30), (30, 49), (70, 60)], 10)  # the first two touch
    assert dd.median_diameter(truth) == pytest.approx(20.0, abs=1.0)
    rng = np.random.default_rng(0)
    image = (truth > 0) * 1000.0 + rng.normal(100, 20, truth.shape)
    pred = dd.classical_nuclei(image, dd.median_diameter(truth))
    assert pred.max() == 3
    assert evaluate_pair(truth, pred)["ap50"] == 1.0


def test_written_field_is_read_back_by_the_segment_library(tmp_path):
    """The layout the benchmark trains from: a JUMP-named folder + cellpose-style mask, channel map."""
    from dinocell.config import DataConfig
    from dinocell.data.sources import open_source
    from dinocell.segment.data import MaskFinder, input_plane, iter_annotated

    labels = disks((40, 56), [(20, 20)], 8)
    planes = {5: (labels * 900 + 50).astype(np.uint16), 2: np.full(labels.shape, 7, np.uint16)}
    dd.write_field(tmp_path / "f", planes, labels, "nuclei")
    src = open_source(DataConfig(source=str(tmp_path / "f"), channel_map={5: "DNA", 2: "ER"}))
    assert sorted(src.channels) == ["DNA", "ER"]
    [(rec, got, truth)] = list(iter_annotated(src, MaskFinder.for_source(src, "nuclei", str(tmp_path / "f"))))
    assert np.array_equal(truth, labels)
    dna = input_plane(got, src.channels, src.fluorescent, "DNA")
    assert dna[labels > 0].mean() > dna[labels == 0].mean()


def test_side_by_side_png(tmp_path):
    from PIL import Image

    lab = disks((64, 80), [(30, 30)], 9)
    out = tmp_path / "p.png"
    dd.side_by_side(out, [("DNA", lab * 1.0, lab, lab), ("ER", lab * 0.5, lab, np.zeros_like(lab))])
    img = Image.open(out)
    assert img.size[1] >= 2 * 64 and img.size[0] >= 3 * 80
    assert not list(tmp_path.glob(".*tmp*"))


def test_pediatric_outlines_fill_to_nuclei(shared_data):
    images, nuclei, cells = dd.load_pediatric_site(shared_data / "pediatric_BR00143976_C03_3")
    assert set(images) >= {"DNA", "ER", "RNA", "AGP", "Mito"}
    assert images["DNA"].shape == nuclei.shape == cells.shape == (1080, 1080)
    assert 30 <= int(len(np.unique(nuclei))) - 1 <= 45
    assert 30 <= int(len(np.unique(cells))) - 1 <= 50
    assert 20 < dd.median_diameter(nuclei) < 80
    dna = images["DNA"].astype(np.float64)
    assert dna[nuclei > 0].mean() > 2 * dna[nuclei == 0].mean()  # labels sit on the DNA stain


def test_dsb2018_classical_baseline_is_a_real_baseline(shared_data):
    """The R1 denominator on the real image: Otsu + watershed finds most of the 125 nuclei."""
    from dinocell.segment.metrics import evaluate_pair

    image, labels = dd.load_dsb2018(shared_data / "dsb2018_nuclei")
    pred = dd.classical_nuclei(image[:, 256:], dd.median_diameter(labels[:, :256]))
    ap50 = evaluate_pair(labels[:, 256:], pred)["ap50"]
    assert 0.4 < ap50 <= 1.0
