"""Gram-teacher crops (dinov3 ``gram_teacher_crops``): produced only with a frozen Gram teacher, larger,
undistorted, and of the same box, channel and flips as the student's global crops."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dinocell.config import LossConfig, ViewsConfig
from dinocell.data.views import MultiViewAugmentation, gram_crop_size
from dinocell.errors import ConfigError

#: every photometric distortion always on, so a distorted crop cannot pass for an undistorted one
_DISTORTED = dict(global_crop_size=32, local_crop_size=16, n_local_crops=2, jitter_prob=1.0,
                  blur_prob_global1=1.0, blur_prob_global2=1.0, solarize_prob_global2=1.0,
                  hflip_prob=0.5, vflip_prob=0.5, global_scale=[0.3, 0.8])


def _field(c: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(c, 80, 72, generator=torch.Generator().manual_seed(seed))


def test_gram_crop_size_follows_the_gram_teacher() -> None:
    views = ViewsConfig(global_crop_size=224)
    assert gram_crop_size(views, LossConfig()) is None  # Gram off by default
    on = LossConfig(gram_weight=1.0)
    assert gram_crop_size(views, on) == 448  # dinov3: 512 for 256
    assert gram_crop_size(views, LossConfig(gram_weight=1.0, gram_target="ema")) is None
    assert gram_crop_size(ViewsConfig(gram_teacher_crop_size=0), on) is None  # the student's crops
    assert gram_crop_size(ViewsConfig(gram_teacher_crop_size=320), on) == 320
    with pytest.raises(ConfigError, match="gram_teacher_crop_size"):
        MultiViewAugmentation(ViewsConfig(), [True], gram_crop_size=-16)


@pytest.mark.parametrize("policy,aligned,n_global", [("multiview", False, 2), ("channel_pairs", False, 2),
                                                     ("all_channels", True, 6)])
def test_shapes_and_no_extra_draws(policy: str, aligned: bool, n_global: int) -> None:
    cfg = ViewsConfig(**{**_DISTORTED, "policy": policy})
    plain = MultiViewAugmentation(cfg, [True] * 5)
    gram = MultiViewAugmentation(cfg, [True] * 5, gram_crop_size=64)
    a = plain(_field(), torch.Generator().manual_seed(3))
    b = gram(_field(), torch.Generator().manual_seed(3))
    assert "gram_teacher_crops" not in a and b["aligned"] is aligned
    assert len(b["gram_teacher_crops"]) == n_global == len(b["global_crops"])
    for t in b["gram_teacher_crops"]:
        assert t.shape == (1, 64, 64) and t.dtype == torch.float32 and t.is_contiguous()
    # the Gram crops take no random draws: every other crop is the one a run without them gets
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"], strict=True):
        assert torch.equal(x, y)


def _undistorted_reference(cfg: ViewsConfig) -> MultiViewAugmentation:
    """The same views at the Gram size whose photometry consumes its random draws but changes nothing:
    its global crops are the student's boxes, channels and flips, undistorted."""
    ref = MultiViewAugmentation(cfg, [True] * 5)

    def draws_only(img: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        MultiViewAugmentation._augment(ref, img.clone(), *args, **kwargs)
        return img

    ref._augment = draws_only  # type: ignore[method-assign]
    return ref


@pytest.mark.parametrize("policy", ["multiview", "channel_pairs", "all_channels"])
def test_gram_crops_are_the_undistorted_global_crops(policy: str) -> None:
    cfg = ViewsConfig(**{**_DISTORTED, "policy": policy})
    aug = MultiViewAugmentation(cfg, [True] * 5, gram_crop_size=64)
    ref = _undistorted_reference(ViewsConfig(**{**_DISTORTED, "policy": policy, "global_crop_size": 64}))
    flipped = distorted = 0
    for seed in range(6):
        out = aug(_field(seed=seed), torch.Generator().manual_seed(seed))
        want = ref(_field(seed=seed), torch.Generator().manual_seed(seed))
        assert out["global_channels"] == want["global_channels"]
        for gram, expected, student in zip(out["gram_teacher_crops"], want["global_crops"], out["global_crops"],
                                           strict=True):
            torch.testing.assert_close(gram, expected, rtol=0, atol=0)  # same box, channel, flips; no photometry
            small = torch.nn.functional.interpolate(gram[None], size=(32, 32), mode="bilinear", antialias=True)[0]
            distorted += not torch.allclose(small, student, atol=0.05)
        flipped += not torch.equal(out["gram_teacher_crops"][0], _ref_no_flip(policy, seed))
    assert distorted > 0 and flipped > 0  # the check above saw real photometry and real flips


def _ref_no_flip(policy: str, seed: int) -> torch.Tensor:
    """Crop 0 at the Gram size with flips off: differs from the Gram crop whenever the student's was flipped."""
    cfg = ViewsConfig(**{**_DISTORTED, "policy": policy, "global_crop_size": 64, "hflip_prob": 0.0, "vflip_prob": 0.0})
    return _undistorted_reference(cfg)(_field(seed=seed), torch.Generator().manual_seed(seed))["global_crops"][0]
