"""One checkpoint, one set of held-out fields: summary.json, the ``eval/*`` callback and
``dinocell evaluate RUN`` report the same figures, exactly (they all run evaluate.heldout)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from dinocell.cli import main
from dinocell.config import load_config
from dinocell.evaluate.heldout import FIGURES
from dinocell.train.run import pretrain
from tests_tiny import TINY

pytestmark = pytest.mark.slow  # one tiny training run (~15 s at rest) shared by both tests

RUN = [*TINY, "data.synthetic.n_fields=64", "train.eval_fields=6", "track.logger=csv",
       "track.attention_log_interval=0", "track.pca_log_interval=1000",  # eval/* at step 0 and at the end
       "track.reference=heldout", "track.reference_every=2", "track.reference_fields=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    summary = pretrain(load_config(None, RUN), out, max_steps=3)
    return out, summary


def _same(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))


def test_summary_callback_and_cli_agree(run: tuple[Path, dict], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out, summary = run
    assert summary["eval_fields"] == 6 < summary["heldout_fields"]
    for key in ("channel_consistency", "cross_channel_retrieval_top1", "transfer_knn_accuracy", "knn_accuracy",
                "patch_consistency", "patch_retrieval_top1"):
        assert summary[f"{key}_after"] is not None, key
        assert summary[f"{key}_before"] is not None, key

    # eval/* logged by the callback at step 0 (before training) and at the last step
    metrics = pd.read_csv(next((out / "csv").glob("version_*/metrics.csv")))
    for step, when in ((0, "before"), (3, "after")):
        rows = metrics[metrics["step"] == step]
        for key in FIGURES:
            col = f"eval/{key}"
            vals = rows[col].dropna() if col in rows else []
            assert len(vals) == 1, (col, step)
            assert float(vals.iloc[0]) == summary[f"{key}_{when}"], (key, when)

    # the callback's own selection (not the fields the run handed it) on the saved checkpoint
    from types import SimpleNamespace

    from dinocell.data.holdout import heldout_source
    from dinocell.evaluate.heldout import measure
    from dinocell.models.loading import load_model
    from dinocell.track.callbacks import DiagnosticsCallback

    cb = DiagnosticsCallback(load_config(out / "config.yaml"), out)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(heldout=heldout_source(out)))
    own = measure(load_model(out).backbone, cb.heldout_fields(trainer, None)).figures
    for key in FIGURES:
        assert _same(own[key], summary[f"{key}_after"]), key

    # `dinocell evaluate RUN`: the run's held-out wells, its eval_fields, its checkpoint
    assert main(["evaluate", str(out), "--out-dir", str(tmp_path / "ev"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_fields"] == 6 and res["heldout_fields"] == summary["heldout_fields"]
    for key in FIGURES:
        assert _same(res["heldout"][key], summary[f"{key}_after"]), key
    # the extended report is computed from the same embeddings
    assert res["channel_consistency"]["centred"] == summary["channel_consistency_after"]
    assert res["cross_channel_retrieval"]["top1"] == summary["cross_channel_retrieval_top1"]
    assert res["patch_consistency"]["centred"] == summary["patch_consistency_after"]
    assert res["patch_retrieval"]["top1"] == summary["patch_retrieval_top1_after"]
    md = (tmp_path / "ev" / "evaluation.md").read_text()
    assert "patch retrieval top-1 (same field)" in md


def test_reference_guard_is_in_the_summary(run: tuple[Path, dict]) -> None:
    out, summary = run
    state = json.loads((out / "reference.json").read_text())
    assert [h["step"] for h in state["history"]] == [0, 2, 3]  # start, every 2 steps, end
    scores = [h["score"] for h in state["history"]]
    assert summary["reference_start"] == scores[0] and summary["reference_end"] == scores[-1]
    assert summary["reference_min"] == min(scores) and summary["reference_metric"] == "knn_accuracy"
    metrics = pd.read_csv(next((out / "csv").glob("version_*/metrics.csv")))
    logged = metrics.dropna(subset=["reference/score"])
    assert logged["step"].tolist() == [0, 2, 3] and logged["reference/score"].tolist() == scores
