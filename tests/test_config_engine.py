"""The one config engine behind every command's schema (pretrain, segment, extract-volumes, embed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dinocell.config import (
    Config,
    config_from_dict,
    load,
    load_config,
    save_config,
    to_dict,
)
from dinocell.errors import ConfigError
from dinocell.segment.config import SegmentConfig, load_segment_config, segment_config_from_dict


def test_run_outputs_written_by_older_versions_still_load(tmp_path: Path) -> None:
    """Old run folders recorded the held-out counts in config.yaml; they load (and resume) unchanged."""
    data = to_dict(load_config(None, ["optim.lr=3e-4"]))
    data["data"]["holdout"].update({"n_wells": 3, "n_fields": 12})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg == load_config(None, ["optim.lr=3e-4"])
    assert config_from_dict(data) == cfg
    seg = to_dict(load_segment_config())
    seg["data"]["holdout"]["n_wells"] = 1
    seg["model"]["object_diameter"] = 12.5  # measured by segment fit: now summary.json object_diameter_px
    assert segment_config_from_dict(seg) == load_segment_config()
    # the retired keys are gone from what is written now, and only they are tolerated
    save_config(cfg, tmp_path / "again")
    assert "n_wells" not in (tmp_path / "again" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.holdout\.n_well'"):
        load_config(None, ["data.holdout.n_well=3"])


@pytest.mark.parametrize("item,match", [
    ("data.views.policy=triple", "'data.views.policy' must be one of multiview, single_view"),
    ("data.batch_size=0", "'data.batch_size' must be >= 1"),
    ("data.illum=maybe", "'data.illum' must be one of auto, off, required"),
    ("data.scaling.mode=fixed", "data.scaling.mode=fixed needs data.scaling.fixed"),
    ("data.holdout.fraction=1", r"'data\.holdout\.fraction' must be in \[0, 1\)"),
    ("data.mask.min_ratio=0.9", "min<=max"),
    ("track.logger=paper", "'track.logger' must be one of"),
])
def test_segment_validates_the_shared_sections_like_pretrain(item: str, match: str) -> None:
    for loader in (load_config, load_segment_config):
        with pytest.raises(ConfigError, match=match):
            loader(None, [item])


def test_train_checkpoint_settings_are_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="'train.keep_last_n' must be >= 1"):
        load_config(None, ["train.keep_last_n=0"])
    with pytest.raises(ConfigError, match="'train.checkpoint_every_steps' must be >= 1"):
        load_config(None, ["train.checkpoint_every_steps=0"])


def test_load_takes_any_schema_and_did_you_mean_names_its_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'task\.chanel'.*did you mean 'task\.channel'"):
        load(SegmentConfig, overrides=["task.chanel=DNA"])
    cfg = load(Config, data={"optim": {"lr": "1e-3"}}, overrides=["optim.lr=2e-3"])
    assert cfg.optim.lr == pytest.approx(2e-3)  # YAML/data first, then overrides


def test_embed_options_and_overrides_go_through_the_engine() -> None:
    from dinocell.evaluate.embed import EmbedOptions, data_config

    assert load(EmbedOptions, data={"batch_size": "8", "view": "mean_image"}) == EmbedOptions(batch_size=8,
                                                                                             view="mean_image")
    with pytest.raises(ConfigError, match=r"unknown config key 'veiw'.*did you mean 'view'"):
        load(EmbedOptions, data={"veiw": "concat"})
    with pytest.raises(ConfigError, match="--patch-maps needs --geometry full"):
        load(EmbedOptions, data={"patch_maps": True})
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.chanels'.*did you mean 'data\.channels'"):
        data_config(None, "synthetic", ["data.chanels=[DNA]"])
    cfg = data_config(None, "synthetic", ["data.channels=[DNA,RNA]", "data.synthetic.seed=4"])
    assert cfg.data.channels == ["DNA", "RNA"] and cfg.data.synthetic.seed == 4
