"""``dinocell export``: one format, a timm folder that timm's own ``local-dir:`` loader rebuilds offline;
old ``.safetensors`` + sidecar exports keep loading through ``load_model``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from loading_fixtures import CHANNELS, fake_run, write_old_export

import dinocell
from dinocell.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    r, _, teacher = fake_run(tmp_path_factory.mktemp("exp"))
    return r, teacher


def test_timm_local_dir_gives_the_load_backbone_embedding(run, tmp_path, monkeypatch) -> None:
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    r, teacher = run
    out = tmp_path / "timm_model"
    assert main(["export", str(r), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dinocell.safetensors", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.rand(3, 1, 32, 48)  # non-square: RoPE, no fixed input size
    with torch.no_grad():
        want = dinocell.load_backbone(r)(x)
        torch.testing.assert_close(model(x), want)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), want)
        torch.testing.assert_close(want, teacher(x))
        torch.testing.assert_close(dinocell.load_backbone(out)(x), want)  # dinocell reads the folder too
        # any timm name + the weights file (how a hub user points timm at a local file)
        by_file = timm.create_model(json.loads((out / "config.json").read_text())["architecture"], pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                                    **json.loads((out / "config.json").read_text())["model_args"]).eval()
        torch.testing.assert_close(by_file(x), want)
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (1, 32, 32) and list(cfg["mean"]) == [0.0] and list(cfg["std"]) == [1.0]
    assert "[1.0, 99.0] percentiles" in cfg["description"]
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_args"]["patch_size"] == 8 and conf["model_args"]["in_chans"] == 1
    notes = [n for n in conf["pretrained_cfg"]["notes"] if n.startswith("dinocell_provenance=")]
    assert len(notes) == 1 and json.loads(notes[0].split("=", 1)[1])["dinocell_version"] == dinocell.__version__
    pre = dinocell.load_model(out).preprocess
    assert (pre.in_chans, pre.patch_size, pre.crop_size) == (1, 8, 32)
    assert pre.scaling.low_percentile == 1.0 and pre.channel_names == CHANNELS


def test_export_folder_has_no_missing_keys_and_is_replaced(run, tmp_path) -> None:
    from safetensors.torch import load_file

    from dinocell.train.export import export_run

    r, teacher = run
    out = export_run(r, tmp_path / "t")
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(teacher.model.state_dict())
    assert set(load_file(str(out / "dinocell.safetensors"))) == {"mask_token", "rope_periods"}
    export_run(r, out)  # re-export into the same folder replaces the files
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dinocell.safetensors", "model.safetensors"]


def test_old_single_file_requests_are_one_line(run, tmp_path, capsys) -> None:
    """``--out X.safetensors`` (the retired format) is refused, not turned into a folder of that name;
    ``--format safetensors`` too; ``--format timm`` of older scripts still works."""
    r, _ = run
    out = tmp_path / "b.safetensors"
    assert main(["export", str(r), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "writes a folder now" in err and f"--out {tmp_path / 'b'}" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(r), "--out", str(tmp_path / "b"), "--format", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert "one format now" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "b").exists()
    assert main(["export", str(r), "--out", str(tmp_path / "b"), "--format", "timm"]) == 0
    assert (tmp_path / "b" / "config.json").is_file()


def test_an_old_safetensors_export_still_loads(run, tmp_path) -> None:
    """Read only: an export written before the folder format (``.safetensors`` + JSON sidecar, made here
    directly), alone or as a run folder's newest export, loads with its preprocessing."""
    import shutil

    from dinocell.models.loading import Preprocess, load_model

    r, teacher = run
    pre = Preprocess(patch_size=8, crop_size=32, channel_names=CHANNELS)
    old = write_old_export(teacher, tmp_path / "b.safetensors",
                           {"preprocess": pre.to_dict(), "channel_names": CHANNELS, "source_run": str(r)})
    x = torch.rand(2, 1, 32, 32)
    m = load_model(old)
    assert m.kind == "export" and m.preprocess == pre and m.cfg is None
    with torch.no_grad():
        torch.testing.assert_close(m.backbone(x), teacher(x))
    run2 = tmp_path / "run2"
    shutil.copytree(r, run2)
    trained = load_model(r / "checkpoints" / "last.ckpt").preprocess
    older = {k: v for k, v in trained.to_dict().items() if k not in ("stain", "illum")}  # before those entries
    write_old_export(teacher, run2 / "export" / "teacher.safetensors", {"preprocess": older})
    m = load_model(run2)  # a run folder's newest export, old format: the run's config comes with it
    assert m.description.startswith("export") and m.run_dir == run2 and m.cfg is not None
    assert m.preprocess == trained and m.preprocess.scaling.high_percentile == 99.0
    with torch.no_grad():
        torch.testing.assert_close(m.backbone(x), teacher(x))
