"""The views' Gram-teacher crops reach the Gram teacher: built by the training views, collated crop-major, read
by the Gram loss, and carried by every batch of a short training run."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dinocell.config import load_config
from dinocell.data.masking import collate_multiview
from dinocell.train.datamodule import build_views
from dinocell.train.meta_arch import MultiViewDINO

GRAM = ["loss.gram_weight=1.0", "loss.gram_max_tokens=1000"]


def test_training_views_make_gram_crops_only_for_a_gram_teacher(tiny_overrides: list[str]) -> None:
    assert build_views(load_config(None, tiny_overrides), [True] * 5).gram_crop_size is None
    assert build_views(load_config(None, tiny_overrides + GRAM), [True] * 5).gram_crop_size == 64  # 2 x 32
    ema = load_config(None, tiny_overrides + GRAM + ["loss.gram_target=ema"])
    assert build_views(ema, [True] * 5).gram_crop_size is None
    from dinocell.errors import ConfigError

    with pytest.raises(ConfigError, match="gram_teacher_crop_size.*multiple of model.patch_size"):
        build_views(load_config(None, tiny_overrides + GRAM + ["data.views.gram_teacher_crop_size=60"]), [True] * 5)


def test_gram_loss_reads_the_gram_crops(tiny_overrides: list[str]) -> None:
    cfg = load_config(None, tiny_overrides + GRAM)
    views = build_views(cfg, [True] * 5)
    fields = [torch.rand(5, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    samples = [views(f, torch.Generator().manual_seed(10 + i)) for i, f in enumerate(fields)]
    batch = collate_multiview(samples, cfg.data.mask, cfg.model.patch_size, rng=0)
    assert batch["gram_teacher_crops"].shape == (6, 1, 64, 64)  # crop-major, like global_crops
    assert torch.equal(batch["gram_teacher_crops"][1], samples[1]["gram_teacher_crops"][0])
    assert torch.equal(batch["gram_teacher_crops"][3], samples[0]["gram_teacher_crops"][1])

    torch.manual_seed(0)
    meta = MultiViewDINO(cfg)
    seen: list[torch.Tensor] = []
    forward = meta.gram_teacher.forward_features

    def spy(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(x)
        return forward(x, *args, **kwargs)

    meta.gram_teacher.forward_features = spy  # type: ignore[method-assign]
    with_crops = meta(batch, 0.04)["gram"]
    assert len(seen) == 1 and seen[0] is batch["gram_teacher_crops"]
    without = meta({k: v for k, v in batch.items() if k != "gram_teacher_crops"}, 0.04)["gram"]
    assert seen[1] is batch["global_crops"]  # the old path: the student's distorted crops
    assert torch.isfinite(with_crops) and not torch.allclose(with_crops, without)


@pytest.mark.slow
def test_short_training_with_gram_feeds_the_gram_crops(tmp_path, tiny_overrides: list[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from dinocell.train.run import pretrain

    shapes: list[tuple[int, ...]] = []
    original = MultiViewDINO.forward

    def recording(self: MultiViewDINO, batch: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(batch["gram_teacher_crops"].shape))
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(MultiViewDINO, "forward", recording)
    cfg = load_config(None, tiny_overrides + GRAM + ["train.eval_fields=0"])
    summary = pretrain(cfg, tmp_path, max_steps=3)
    assert summary["steps"] == 3 and len(shapes) >= 3
    assert all(s == (8, 1, 64, 64) for s in shapes)  # batch 4 x 2 globals at 2 x 32
