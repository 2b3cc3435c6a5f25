"""Issue 22 item 1: what a model is fed at inference equals what training fed it.

A model is trained (a checkpoint with its training config) on a load_data source with illumination
functions and ``data.scaling.mode=fixed``.  The tensors every consumer feeds the backbone are compared,
exactly, with the training source's finished field (``source.load(rec)``): ``embed`` (= ``extract-fields``),
``evaluate --data``, ``segment predict`` (through ``segment.model.segmentation_model``), a bare array
through ``Preprocess.scale`` (``evaluate --labelled``), a volume through ``Preprocess.scale_volume``, and the
export folder that carries the settings (and an old ``.safetensors`` sidecar, still read).  A field-scaled, uncorrected read differs (the check has teeth).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from loading_fixtures import fake_run, write_old_export  # noqa: E402

from dinocell.config import load_config  # noqa: E402
from dinocell.data.sources import open_source  # noqa: E402
from dinocell.errors import UserError  # noqa: E402
from dinocell.models.loading import LoadedModel, load_model  # noqa: E402

CHANNELS = ["DNA", "ER"]
SIZE = 32  # fields of one training crop: the evaluation's square crop and resize leave them untouched
FIXED = "{DNA: [150.0, 2500.0], ER: [300.0, 3500.0]}"


def _illum_source(root: Path) -> Path:
    """load_data_with_illum table: one plate, 2 wells x 2 sites, uint16 images, centre-bright functions."""
    rng = np.random.default_rng(5)
    img, ill = root / "images", root / "illum"
    img.mkdir(parents=True)
    ill.mkdir()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i, c in enumerate(CHANNELS):
        f = 1.0 + 0.2 * i + np.exp(-((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) / SIZE ** 2)
        np.save(ill / f"P1_Illum{c}.npy", f.astype(np.float32))
    rows = []
    for well in ("A01", "A02"):
        for site in (1, 2):
            row = {"Metadata_Plate": "P1", "Metadata_Well": well, "Metadata_Site": site}
            for c in CHANNELS:
                name = f"P1_{well}_s{site}_{c}.tiff"
                tifffile.imwrite(img / name, rng.integers(50, 4000, (SIZE, SIZE), dtype=np.uint16))
                row.update({f"FileName_Orig{c}": name, f"PathName_Orig{c}": str(img),
                            f"FileName_Illum{c}": f"P1_Illum{c}.npy", f"PathName_Illum{c}": str(ill)})
            rows.append(row)
    table = root / "load_data_with_illum.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel, object, dict[str, torch.Tensor]]:
    """(table, the loaded model, its training source, {record key/channel: the finished training channel})."""
    root = tmp_path_factory.mktemp("equality")
    table = _illum_source(root / "data")
    run, cfg, _ = fake_run(root, extra=[f"data.source={table}", "data.channels=[DNA, ER]", "data.illum=required",
                                        "data.scaling.mode=fixed", f"data.scaling.fixed={FIXED}"])
    m = load_model(run)
    train_source = open_source(cfg.data)  # what pretraining read: corrected, fixed ranges
    assert train_source.describe()["illum"] == "on" and train_source.describe()["scaling"] == "fixed"
    want = {}
    for rec in train_source.records:
        field = torch.from_numpy(train_source.load(rec))
        for i, c in enumerate(train_source.channels):
            want[f"{rec.key}/{c}"] = field[i]
    return table, m, train_source, want


def _record_inputs(m: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every single-channel image the backbone's ``forward_features`` receives, in order."""
    seen: list[torch.Tensor] = []
    bb = m.backbone
    orig = type(bb).forward_features

    def recording(x: torch.Tensor, *a: object, **k: object) -> object:
        seen.extend(x.detach().reshape(-1, *x.shape[-2:]).clone())
        return orig(bb, x, *a, **k)

    monkeypatch.setattr(bb, "forward_features", recording, raising=False)
    return seen


def _fed_exactly(seen: list[torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for key, ref in want.items():
        assert any(t.shape == ref.shape and torch.equal(t, ref) for t in seen), f"{key} not fed as in training"


def test_the_default_rule_differs(trained) -> None:
    """The check has teeth: an uncorrected, field-scaled read of the same field is another tensor."""
    table, _, train_source, want = trained
    plain = open_source(load_config(None, ["data.channels=[DNA, ER]", "data.illum=off"]).data, str(table))
    rec = plain.records[0]
    assert not torch.equal(torch.from_numpy(plain.load(rec))[0], want[f"{rec.key}/DNA"])


def test_embed_feeds_the_training_tensors(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dinocell.evaluate.embed import run_embed

    table, m, _, want = trained
    seen = _record_inputs(m, monkeypatch)
    run_embed(m, tmp_path / "emb", data=str(table), geometry="full")  # every channel whole, native size
    assert len(seen) == len(want)
    _fed_exactly(seen, want)


def test_an_export_alone_embeds_like_training(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No run folder, no config: the export's notes alone configure the source (illum, fixed ranges, stain)."""
    from dinocell.evaluate.embed import run_embed
    from dinocell.train.export import export_run

    table, m, _, want = trained
    exported = load_model(export_run(m.run_dir, tmp_path / "t"))
    assert exported.cfg is None and exported.run_dir is None
    seen = _record_inputs(exported, monkeypatch)
    run_embed(exported, tmp_path / "emb", data=str(table), geometry="full")
    _fed_exactly(seen, want)


def test_a_model_trained_without_correction_is_fed_uncorrected_fields(trained, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``data.illum=off`` in training: the consumer's source must not correct, although the table has functions."""
    import dataclasses

    from dinocell.evaluate.embed import run_embed

    table, m, train_source, _ = trained
    off = LoadedModel(m.backbone, dataclasses.replace(m.preprocess, illum="off"), None, "export", None, kind="export")
    assert m.cfg is not None
    uncorrected = open_source(dataclasses.replace(m.cfg.data, illum="off"), str(table))
    want = {f"{r.key}/{c}": torch.from_numpy(uncorrected.load(r))[i]
            for r in uncorrected.records for i, c in enumerate(uncorrected.channels)}
    seen = _record_inputs(off, monkeypatch)
    run_embed(off, tmp_path / "emb", data=str(table), geometry="full")
    _fed_exactly(seen, want)
    corrected = {f"{r.key}/DNA": torch.from_numpy(train_source.load(r))[0] for r in train_source.records}
    assert not any(torch.equal(t, ref) for t in seen for ref in corrected.values())


def test_extract_fields_cli_feeds_the_training_tensors(trained, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import dinocell.evaluate.embed as embed_mod
    from dinocell.cli import main

    table, m, _, want = trained
    seen = _record_inputs(m, monkeypatch)
    monkeypatch.setattr(embed_mod, "load_model", lambda *a, **k: m)  # the CLI's model: this loaded one
    assert main(["extract-fields", str(m.run_dir), "--data", str(table), "--geometry", "full",
                 "--out", str(tmp_path / "x")]) == 0
    _fed_exactly(seen, want)


def test_evaluate_data_feeds_the_training_tensors(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dinocell.evaluate.run import evaluate

    table, m, _, want = trained
    seen = _record_inputs(m, monkeypatch)
    evaluate(m, tmp_path / "ev", data=str(table))
    _fed_exactly(seen, want)


def test_segment_predict_feeds_the_training_tensors(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dinocell.segment.predict as predict_mod
    from dinocell.segment.config import load_segment_config
    from dinocell.segment.model import SegmentationNet, segmentation_model

    table, m, _, want = trained
    cfg = load_segment_config(None, [f"model.backbone={m.run_dir}", "task.channel=DNA", "model.neck_dim=8",
                                     "model.decoder_dim=8"])
    assert cfg.data.scaling.mode == "field"  # the segment config's default...
    seg = segmentation_model(cfg)
    assert (cfg.data.scaling.mode, cfg.data.illum) == ("fixed", "required")  # ...replaced by the backbone's
    planes: list[np.ndarray] = []

    def recording(net: object, image: np.ndarray, cfg: object, device: object = None) -> np.ndarray:
        planes.append(np.array(image))
        return np.zeros(image.shape[-2:], dtype=np.int32)

    monkeypatch.setattr(predict_mod, "segment_image", recording)
    predict_mod.predict(SegmentationNet(seg.backbone, cfg.model), cfg, [str(table)], tmp_path / "seg")
    dna = {k: v for k, v in want.items() if k.endswith("/DNA")}
    assert len(planes) == len(dna)
    _fed_exactly([torch.from_numpy(p) for p in planes], dna)


def test_bare_arrays_and_volumes_follow_the_same_rule(trained, tmp_path: Path) -> None:
    from dinocell.evaluate.run import LabelledImages

    _, m, train_source, want = trained
    paths = []
    for rec in train_source.records:  # illumination-corrected fields written as they are
        p = tmp_path / f"{rec.well}_{rec.site}.tiff"
        tifffile.imwrite(p, train_source.corrected(train_source.load_raw(rec), rec))
        paths.append((rec, str(p)))
    images = LabelledImages([p for _, p in paths], ["a", "b", "a", "b"], m.preprocess, CHANNELS)
    for (rec, _), r in zip(paths, images.records, strict=True):
        got = torch.from_numpy(images.load(r))
        for i, c in enumerate(CHANNELS):
            assert torch.equal(got[i], want[f"{rec.key}/{c}"])
    with pytest.raises(UserError, match="name the field's channels|no range for channel"):
        LabelledImages([p for _, p in paths], ["a"] * 4, m.preprocess, ["x", "y"])
    rec = train_source.records[0]
    corrected = train_source.corrected(train_source.load_raw(rec), rec)
    vol = np.stack([corrected[0]] * 4)  # a DNA "volume": every slice the same corrected field
    got = m.preprocess.scale_volume(vol, "DNA")
    assert all(torch.equal(torch.from_numpy(got[k]), want[f"{rec.key}/DNA"]) for k in range(4))


def test_plate_scaling_on_a_bare_array_is_one_clear_error(trained) -> None:
    import dataclasses

    _, m, _, _ = trained
    pre = dataclasses.replace(m.preprocess, scaling=dataclasses.replace(m.preprocess.scaling, mode="plate"))
    with pytest.raises(UserError, match="plate statistics") as ei:
        pre.scale(np.zeros((2, 8, 8), np.uint16), CHANNELS)
    assert "\n" not in str(ei.value)


def test_exports_carry_the_settings(trained, tmp_path: Path) -> None:
    """The export folder and an old ``.safetensors`` sidecar give back the checkpoint's Preprocess (fixed
    ranges, stain, illum); an older sidecar without them reads as the defaults."""
    import json

    from dinocell.models.loading import Preprocess
    from dinocell.train.export import export_run

    _, m, _, _ = trained
    folder = export_run(m.run_dir, tmp_path / "timm")
    old_file = write_old_export(m.backbone, tmp_path / "b.safetensors", {"preprocess": m.preprocess.to_dict()})
    for path in (folder, old_file):
        back = load_model(path).preprocess
        assert back == m.preprocess and back.scaling.fixed["DNA"] == [150.0, 2500.0] and back.illum == "required"
    side = json.loads(Path(f"{old_file}.json").read_text())
    old = {k: v for k, v in side["preprocess"].items() if k not in ("stain", "illum")}
    old["scaling"] = {k: v for k, v in old["scaling"].items() if k not in ("mode", "fixed")}
    assert Preprocess.from_dict(old).scaling.mode == "field" and Preprocess.from_dict(old).illum == "auto"
