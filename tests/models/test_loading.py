"""The one loader: every saved form -> the same backbone and the preprocessing it was trained with."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from loading_fixtures import CHANNELS, fake_run

import dinocell
from dinocell.config import ScalingConfig
from dinocell.errors import UserError
from dinocell.models.loading import Preprocess, crop_to_patches, load_model, official_model_name


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    r, _, teacher = fake_run(tmp_path_factory.mktemp("load"))
    return r, teacher


def test_run_folder_checkpoint_and_export_load_the_teacher(run) -> None:
    from dinocell.train.export import export_run

    r, teacher = run
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want = teacher(x)
        for spec in (r, r / "checkpoints" / "last.ckpt"):
            m = load_model(spec)
            assert not m.backbone.training and m.run_dir == r and m.cfg is not None
            assert m.crop_size == 32 and m.channel_names == CHANNELS
            assert m.preprocess.scaling.high_percentile == 99.0 and m.preprocess.patch_size == 8
            torch.testing.assert_close(m.backbone(x), want)
        student = load_model(r, which="student").backbone
        assert not torch.allclose(student(x), want)
        export_run(r, r / "export" / "teacher")
        m = load_model(r)  # a run folder prefers its newest export
        assert m.description.startswith("export") and m.cfg is not None and m.channel_names == CHANNELS
        assert m.run_dir == r and m.kind == "export"
        torch.testing.assert_close(m.backbone(x), want)
        torch.testing.assert_close(dinocell.load_backbone(r)(x), want)
    shutil.rmtree(r / "export")


def test_errors_are_one_line_user_errors(run, tmp_path) -> None:
    r, _ = run
    with pytest.raises(UserError, match="model not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(UserError, match="neither an export"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="cannot tell"):
        load_model(tmp_path / "weights.bin")
    torch.save({"state_dict": {"other.w": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    (tmp_path / "config.yaml").write_text((r / "config.yaml").read_text())
    with pytest.raises(UserError, match="no teacher backbone"):
        load_model(tmp_path / "bad.ckpt")
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises(UserError, match="cannot tell the architecture"):
        load_model(tmp_path / "w.pth")


def test_checkpoint_that_runs_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="refusing to load"):
        load_model(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_official_names_from_release_files() -> None:
    assert official_model_name("dinov3_vits16_pretrain_lvd1689m-08c60483.pth") == "vit_small_patch16_dinov3"
    assert official_model_name("/w/dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth") == "vit_huge_plus_patch16_dinov3"
    assert official_model_name("my_weights.pth") is None


def test_preprocess_matches_the_data_layer_scaling() -> None:
    from dinocell.data.decode import scale_field

    rng = np.random.default_rng(0)
    raw = rng.gamma(2.0, 300.0, size=(3, 40, 50)).astype(np.uint16)
    scaling = ScalingConfig(low_percentile=1.0, high_percentile=99.0)
    pre = Preprocess(in_chans=1, patch_size=8, crop_size=32, scaling=scaling)
    x = pre(raw)
    assert x.shape == (3, 1, 40, 48) and x.dtype == torch.float32
    ref = crop_to_patches(torch.from_numpy(scale_field(raw, scaling)), 8)
    assert torch.equal(x[:, 0], ref)  # one implementation: exactly the data sources' scaling
    assert pre(ref, scaled=True)[:, 0].equal(ref)
    multi = Preprocess(in_chans=3, patch_size=8)
    assert multi(raw).shape == (1, 3, 40, 48)
    with pytest.raises(UserError, match="expects 3 input channels"):
        multi(raw[:2])
    assert Preprocess.from_dict(pre.to_dict()) == pre


def test_crop_to_patches_centres_and_rejects_tiny() -> None:
    img = torch.arange(10 * 13, dtype=torch.float32).reshape(1, 10, 13)
    assert torch.equal(crop_to_patches(img, 4), img[:, 1:9, 0:12])
    with pytest.raises(UserError, match="smaller than the patch size"):
        crop_to_patches(img[:, :2, :2], 4)


def test_one_door_for_random_init_and_pth_into_an_architecture(tmp_path) -> None:
    """``load_model(None, arch=...)`` builds the architecture; a ``.pth`` goes into ``arch`` (e.g. the
    segmenter's); a checkpoint's recorded architecture dict is accepted too."""
    from dinocell.config import ModelConfig
    from dinocell.models.backbone import build_backbone

    arch = ModelConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    a = load_model(None, arch=arch)
    torch.manual_seed(0)
    built = build_backbone(arch).state_dict()
    assert all(torch.equal(v, built[k]) for k, v in a.backbone.state_dict().items())
    assert (a.kind, a.trained_preprocess, a.preprocess.patch_size, a.backbone.training) == ("random", False, 8, False)
    again = load_model(None, arch=a.backbone.arch)  # DinoBackbone.arch, as a segment checkpoint records it
    assert again.backbone.arch == a.backbone.arch
    torch.save(a.backbone.model.state_dict(), tmp_path / "weights.pth")
    into = load_model(tmp_path / "weights.pth", arch=arch)
    assert into.kind == "official" and not into.trained_preprocess
    torch.testing.assert_close(into.backbone.model.state_dict(), a.backbone.model.state_dict())
    with pytest.raises(UserError, match="no model given"):
        load_model(None)
