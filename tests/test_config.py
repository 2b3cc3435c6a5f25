from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dinocell.config import Config, load_config, save_config
from dinocell.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_mirror_dinov3() -> None:
    cfg = Config()
    assert cfg.loss.koleo_weight == 0.1
    assert cfg.loss.warmup_teacher_temp == 0.04 and cfg.loss.teacher_temp == 0.07
    assert cfg.optim.weight_decay == 0.04 and cfg.optim.weight_decay_end == 0.4
    assert cfg.optim.layerwise_decay == 0.9 and cfg.optim.patch_embed_lr_mult == 0.2
    assert cfg.optim.clip_grad == 3.0
    assert cfg.data.views.global_scale == [0.32, 1.0] and cfg.data.views.local_scale == [0.05, 0.32]
    assert cfg.data.mask.min_ratio == 0.1 and cfg.data.mask.max_ratio == 0.5


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "exp.yaml"
    f.write_text("optim:\n  lr: 0.001\ndata:\n  batch_size: 16\n  channels: [DNA, RNA]\n")
    cfg = load_config(f, ["optim.lr=2e-4", "data.views.policy=single_view", "model.pretrained=null"])
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.data.batch_size == 16
    assert cfg.data.channels == ["DNA", "RNA"]
    assert cfg.data.views.policy == "single_view"
    assert cfg.model.pretrained is None


def test_list_override_from_cli_string() -> None:
    cfg = load_config(None, ["data.channels=[DNA,RNA,ER,AGP,Mito]"])
    assert cfg.data.channels == ["DNA", "RNA", "ER", "AGP", "Mito"]


def test_unknown_key_names_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*did you mean 'optim\.lr'"):
        load_config(None, ["optim.lrr=1"])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  views:\n    n_local_crop: 4\n")
    with pytest.raises(ConfigError, match=r"data\.views\.n_local_crop.*data\.views\.n_local_crops"):
        load_config(f)


def test_wrong_type_names_key() -> None:
    with pytest.raises(ConfigError, match=r"'data\.batch_size' expects an integer"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["data.views.policy=triple"])


def test_missing_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])


def test_save_config_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.lr=3e-4"])
    out = save_config(cfg, tmp_path / "run")
    data = yaml.safe_load(out.read_text())
    assert data["optim"]["lr"] == pytest.approx(3e-4)
    again = load_config(out)
    assert again == cfg


@pytest.mark.parametrize("name", ["demo_synthetic.yaml", "vits16_jump_local.yaml", "vits8_jump_s3_multiview.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert cfg.loss.dino_weight > 0


def test_vits8_s3_config_matches_spec() -> None:
    cfg = load_config(REPO / "configs" / "vits8_jump_s3_multiview.yaml")
    assert cfg.model.patch_size == 8 and cfg.model.name == "vit_small_patch16_dinov3"
    assert cfg.data.batch_size == 64 and cfg.optim.lr == pytest.approx(5e-5)
    assert cfg.optim.weight_decay == pytest.approx(0.04) and cfg.optim.warmup_epochs == 10
    assert cfg.train.epochs == 100 and cfg.train.precision == "bf16-mixed"
    assert cfg.data.views.n_local_crops == 8
    assert (cfg.loss.dino_weight, cfg.loss.ibot_weight, cfg.loss.koleo_weight) == (1.0, 1.0, 0.1)
    assert (cfg.data.mask.min_ratio, cfg.data.mask.max_ratio) == (0.1, 0.5)
    assert cfg.data.source.startswith("s3://")
