"""``dinocell segment fit | predict | evaluate`` end to end on tiny synthetic data, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from dinocell.cli import main
from dinocell.data.synthetic import write_jump_folder

TINY = ["data.synthetic.n_fields=4", "data.synthetic.size=32", "data.synthetic.wells_per_plate=4",
        "data.synthetic.sites_per_well=1", "data.synthetic.n_plates=1", "model.arch.embed_dim=32",
        "model.arch.depth=2", "model.arch.num_heads=2", "model.arch.patch_size=8", "model.neck_dim=16",
        "model.decoder_dim=8", "task.crop_size=32", "train.steps=3", "train.batch_size=2",
        "train.progress_bar=false", "track.logger=none", "train.precision=32", "infer.tile=32",
        "train.checkpoint_every_steps=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "run"
    assert main(["segment", "fit", "--output-dir", str(out), *TINY]) == 0
    return out


def test_fit_writes_checkpoint_config_and_summary(run: Path) -> None:
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["objects"] == "nuclei" and summary["channel"] == "DNA"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # plain data only
    assert "dinocell_segment" in ckpt


def test_fit_records_the_code_that_made_it(run: Path) -> None:
    """config.yaml's header comments and summary.json name the dinocell version and git commit, as
    pretrain's do; the config stays a strict segment config that reloads."""
    from dinocell.config import config_record
    from dinocell.provenance import provenance
    from dinocell.segment.config import load_segment_config

    want = provenance()
    assert config_record(run / "config.yaml") == want
    assert (run / "config.yaml").read_text().startswith(f'# dinocell_version: "{want["dinocell_version"]}"\n')
    summary = json.loads((run / "summary.json").read_text())
    assert {k: summary[k] for k in want} == want
    assert load_segment_config(run / "config.yaml").task.objects == "nuclei"


def test_fit_records_scale_and_holdout(run: Path) -> None:
    """auto scale: the chosen scale is in config.yaml and summary.json and predict reuses it; the
    measured diameter is a run output (summary.json only); data.holdout wells are not trained on and
    are reported."""
    from dinocell.segment.run import load_segmenter

    summary = json.loads((run / "summary.json").read_text())
    assert summary["input_scale_from"] == "auto" and summary["object_diameter_px"] > 0
    assert summary["input_scale"] == pytest.approx(min(4.0, 2.5 * 8 / summary["object_diameter_px"]), rel=1e-3)
    net, cfg, _ = load_segmenter(run)
    assert net.input_scale == summary["input_scale"] == cfg.model.input_scale
    assert "object_diameter" not in (run / "config.yaml").read_text()
    assert "n_wells" not in (run / "config.yaml").read_text()  # run outputs never go into the input config
    # 4 wells, holdout fraction 0.1 -> one well held out, three trained on
    assert summary["heldout_wells"] == 1 and summary["heldout_fields"] == 1 and summary["fields"] == 3
    held = (run / "holdout.txt").read_text().split()
    assert len(held) == 1 and held[0].startswith("SYNTH-P01/")


def test_fit_resumes(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["segment", "fit", "--output-dir", str(run), *TINY, "train.steps=4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4


def test_predict_synthetic_writes_labels_and_table(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    assert main(["segment", "predict", str(run), "synthetic", "--out", str(out), "--channel", "mean",
                 "--override", "data.synthetic.n_fields=2"]) == 0
    masks = sorted((out / "masks").glob("*_nuclei_masks.tif"))
    assert [m.name for m in masks] == ["SYNTH-P01_A01_s1_nuclei_masks.tif", "SYNTH-P01_B01_s1_nuclei_masks.tif"] or \
        len(masks) == 2
    labels = tifffile.imread(masks[0])
    assert labels.shape == (32, 32) and labels.dtype in (np.uint16, np.uint32)
    table = pd.read_parquet(out / "nuclei.parquet")
    for col in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Nuclei_Number_Object_Number",
                "Nuclei_AreaShape_Area", "Nuclei_AreaShape_Center_X", "Nuclei_AreaShape_BoundingBoxMaximum_Y",
                "Nuclei_Intensity_MeanIntensity_DNA", "Nuclei_Intensity_MeanIntensity_Mito"):
        assert col in table.columns
    n_objects = sum(int(tifffile.imread(m).max()) for m in masks)
    assert len(table) == n_objects


def test_predict_jump_folder_and_image_file(run: Path, tmp_path: Path) -> None:
    data = tmp_path / "jump"
    write_jump_folder(data, n_fields=2, size=40, n_plates=1, wells_per_plate=4, sites_per_well=1)
    out = tmp_path / "pred"
    assert main(["segment", "predict", str(run), str(data), "--out", str(out)]) == 0
    assert len(list((out / "masks").glob("*.tif"))) == 2
    image = next(data.rglob("*-ch5sk1fk1fl1.tiff"))
    assert main(["segment", "predict", str(run), str(image), "--out", str(tmp_path / "one")]) == 0
    assert tifffile.imread(next((tmp_path / "one" / "masks").glob("*.tif"))).shape == (40, 40)


def test_evaluate_json(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["segment", "evaluate", str(run), "--data", "synthetic", "--fields", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fields"] == 2 and res["objects"] == "nuclei"
    assert set(res["channels"]) == {"DNA", "ER", "RNA", "AGP", "Mito", "mean"}
    for s in res["channels"].values():
        assert 0.0 <= s["ap50"] <= 1.0 and 0.0 <= s["ap"] <= s["ap50"] + 1e-9
    assert len(res["per_image"]) == 2 * 6


def test_evaluate_jump_folder_with_masks(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "jump"
    write_jump_folder(data, n_fields=2, size=32, n_plates=1, wells_per_plate=4, sites_per_well=1, masks=True)
    assert main(["segment", "evaluate", str(run), "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "AP50" in text and "DNA *" in text and "mean" in text


# -------------------------------------------------------------------------------------- bad inputs


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_unknown_channel_exits_2(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["segment", "predict", str(run), "synthetic", "--out", str(tmp_path), "--channel", "Actin"],
           capsys, "unknown channel 'Actin'")
    _fails(["segment", "fit", "--output-dir", str(tmp_path / "r"), *TINY, "task.channel=Actin"], capsys,
           "unknown channel 'Actin'")


def test_no_masks_and_shape_mismatch_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "jump"
    write_jump_folder(data, n_fields=2, size=32, n_plates=1, wells_per_plate=4, sites_per_well=1)
    _fails(["segment", "fit", "--output-dir", str(tmp_path / "r"), *TINY, f"data.source={data}"], capsys,
           "no nuclei masks found")
    write_jump_folder(data, n_fields=2, size=32, n_plates=1, wells_per_plate=4, sites_per_well=1, masks=True)
    for p in data.rglob("*_nuclei_masks.tif"):
        tifffile.imwrite(p, np.zeros((8, 8), np.uint16))
    _fails(["segment", "fit", "--output-dir", str(tmp_path / "r"), *TINY, f"data.source={data}"], capsys,
           "has shape (8, 8)")


def test_backbone_of_another_architecture_exits_2(run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from dinocell.config import ModelConfig
    from dinocell.models.backbone import build_backbone

    other = build_backbone(ModelConfig(patch_size=8, embed_dim=48, depth=2, num_heads=2))
    pth = tmp_path / "other.pth"
    torch.save(other.model.state_dict(), pth)
    _fails(["segment", "fit", "--output-dir", str(tmp_path / "r"), *TINY, "--backbone", str(pth)], capsys,
           "do not fit")
    # resuming a run with a different architecture
    _fails(["segment", "fit", "--output-dir", str(run), *TINY, "model.arch.embed_dim=48", "train.steps=9"],
           capsys, "does not match")


def test_bad_config_and_run_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails(["segment", "fit", "--output-dir", str(tmp_path), "task.chanel=DNA"], capsys, "task.channel")
    _fails(["segment", "evaluate", str(tmp_path), "--data", "synthetic"], capsys, "no segmentation checkpoint")


def test_finetune_mode_trains_the_backbone(run: Path, tmp_path: Path) -> None:
    """Same seed, same initial backbone: the frozen run keeps it, the fine-tuned run changes it."""
    from dinocell.segment.run import load_segmenter

    out = tmp_path / "ft"
    assert main(["segment", "fit", "--output-dir", str(out), *TINY, "model.mode=finetune", "train.steps=2"]) == 0
    net, cfg, _ = load_segmenter(out)
    assert cfg.model.mode == "finetune" and not net.frozen
    tuned = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    frozen = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    keys = [k for k in frozen if k.startswith("net.backbone.model.blocks.")]
    assert keys and any(not torch.equal(tuned[k], frozen[k]) for k in keys)
    # the frozen run still holds the seeded initial backbone
    import lightning as L

    from dinocell.models.loading import load_model

    L.seed_everything(0, verbose=False)
    init = load_model(None, arch=cfg.model.arch).backbone.state_dict()
    assert all(torch.equal(init[k[len("net.backbone."):]], frozen[k]) for k in keys)
