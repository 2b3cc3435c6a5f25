"""``dinocell export --format timm``: timm's own ``local-dir:`` loader rebuilds the same backbone, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from loading_fixtures import CHANNELS, fake_run

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
    assert main(["export", str(r), "--format", "timm", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.rand(3, 1, 32, 48)  # non-square: RoPE, no fixed input size
    with torch.no_grad():
        want = dinocell.load_backbone(r)(x)
        torch.testing.assert_close(model(x), want)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), want)
        torch.testing.assert_close(want, teacher(x))
        torch.testing.assert_close(dinocell.load_backbone(out)(x), want)  # dinocell reads the folder too
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


def test_timm_export_has_no_missing_keys(run, tmp_path) -> None:
    from safetensors.torch import load_file

    from dinocell.train.export import export_run

    r, teacher = run
    out = export_run(r, tmp_path / "t", fmt="timm")
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(teacher.model.state_dict())
    export_run(r, out, fmt="timm")  # re-export into the same folder replaces the files
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_default_export_keeps_sidecar_format(run, tmp_path, capsys) -> None:
    r, teacher = run
    out = tmp_path / "b.safetensors"
    assert main(["export", str(r), "--out", str(out)]) == 0
    side = json.loads(Path(f"{out}.json").read_text())
    assert side["format"] == "dinocell-backbone" and side["channel_names"] == CHANNELS
    assert side["preprocess"]["crop_size"] == 32 and side["preprocess"]["scaling"]["high_percentile"] == 99.0
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dinocell.load_backbone(out)(x), teacher(x))
    from dinocell.errors import UserError
    from dinocell.train.export import export_run

    with pytest.raises(UserError, match="unknown export format 'onnx'"):
        export_run(r, out, fmt="onnx")
