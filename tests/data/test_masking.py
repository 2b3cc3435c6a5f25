"""iBOT block masks and the multi-crop collate function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinocell.config import MaskConfig
from dinocell.data.masking import BlockMaskGenerator, collate_multiview
from dinocell.errors import ConfigError


def _components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected components of a bool mask."""
    seen = np.zeros_like(mask)
    sizes = []
    h, w = mask.shape
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                stack, n = [(i, j)], 0
                seen[i, j] = True
                while stack:
                    y, x = stack.pop()
                    n += 1
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            stack.append((yy, xx))
                sizes.append(n)
    return sizes


def test_block_mask_exact_count_and_shape() -> None:
    gen = BlockMaskGenerator((14, 14))
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 20, 50, 98):
        m = gen(n, rng)
        assert m.shape == (14, 14) and m.dtype == bool
        assert int(m.sum()) == n


def test_blocks_only_never_overshoot_and_respect_min_size() -> None:
    gen = BlockMaskGenerator((14, 14), min_num_patches=4, complete_randomly=False)
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(4, 99))
        m = gen(n, rng)
        assert 0 < m.sum() <= n
        # every component contains at least one whole block, hence >= min_num_patches patches
        assert min(_components(m)) >= 4
    # blocks are contiguous rectangles: a single small request gives one filled rectangle
    m = gen(6, np.random.default_rng(2))
    rows, cols = np.nonzero(m)
    assert m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_blocks_mostly_reach_target() -> None:
    gen = BlockMaskGenerator((14, 14), complete_randomly=False)
    rng = np.random.default_rng(3)
    got = [gen(60, rng).sum() for _ in range(50)]
    assert np.mean(got) > 0.9 * 60


def test_aspect_ratio_bounds_for_single_block() -> None:
    gen = BlockMaskGenerator((32, 32), min_num_patches=16, min_aspect=0.5, max_aspect=2.0,
                             complete_randomly=False)
    rng = np.random.default_rng(4)
    for _ in range(30):
        m = gen(16, rng)  # exactly one block of >= 16 patches that adds <= 16: one 16-patch rectangle
        rows, cols = np.nonzero(m)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert h * w == 16 and m.sum() == 16
        assert 0.5 * 0.7 <= h / w <= 2.0 / 0.7  # rounding of h, w widens the range slightly


def test_block_generator_rejects_bad_aspect() -> None:
    with pytest.raises(ConfigError, match="aspect"):
        BlockMaskGenerator((4, 4), min_aspect=2.0, max_aspect=1.0)


def _samples(b: int, n_local: int = 3, g: int = 64, loc: int = 32) -> list[dict]:
    out = []
    for i in range(b):
        out.append({
            "global_crops": [torch.full((1, g, g), float(10 * i + k)) for k in range(2)],
            "local_crops": [torch.full((1, loc, loc), float(100 * i + k)) for k in range(n_local)],
            "global_channels": [-1, i % 5],
            "local_channels": [k % 2 - 1 for k in range(n_local)],
            "label": i,
            "index": np.int64(100 + i),
            "key": f"plate/A01/{i}",
        })
    return out


def test_collate_stacks_crop_major() -> None:
    out = collate_multiview(_samples(4), MaskConfig(), patch_size=16, rng=0)
    assert out["global_crops"].shape == (8, 1, 64, 64)
    assert out["local_crops"].shape == (12, 1, 32, 32)
    # row k*B + b is crop k of sample b
    assert [float(t[0, 0, 0]) for t in out["global_crops"]] == [0, 10, 20, 30, 1, 11, 21, 31]
    assert float(out["local_crops"][1 * 4 + 2, 0, 0, 0]) == 201
    assert out["global_channels"].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3]
    assert out["global_channels"].dtype == torch.long
    assert out["local_channels"].tolist() == [-1] * 4 + [0] * 4 + [-1] * 4
    assert out["label"].tolist() == [0, 1, 2, 3] and out["index"].tolist() == [100, 101, 102, 103]
    assert out["key"] == [f"plate/A01/{i}" for i in range(4)]


@pytest.mark.parametrize("b", [2, 4, 8])
def test_collate_masks_half_of_globals_with_ratios_in_bounds(b: int) -> None:
    cfg = MaskConfig(min_ratio=0.1, max_ratio=0.5)
    out = collate_multiview(_samples(b, g=224), cfg, patch_size=16, rng=np.random.default_rng(b))
    masks = out["masks"]
    n = (224 // 16) ** 2
    assert masks.shape == (2 * b, n) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert int((counts > 0).sum()) == b  # exactly half of the 2B global crops
    ratios = sorted((counts[counts > 0].float() / n).tolist())
    assert all(0.1 - 1 / n <= r <= 0.5 for r in ratios)
    # ratios are spread over the range: the i-th smallest sits at the upper edge of the i-th slice
    edges = np.linspace(0.1, 0.5, b + 1)
    for i, r in enumerate(ratios):
        assert edges[i + 1] - 1 / n <= r <= edges[i + 1] + 1e-6


def test_collate_indices_and_weights_consistent() -> None:
    out = collate_multiview(_samples(6, g=128), MaskConfig(), patch_size=16, rng=1)
    masks = out["masks"]
    flat = masks.reshape(-1)
    idx = out["mask_indices"]
    assert idx.dtype == torch.long
    assert torch.equal(idx, torch.nonzero(flat).reshape(-1))
    assert out["n_masked_patches"] == int(flat.sum()) == idx.numel()
    w = out["masks_weight"]
    assert w.shape == idx.shape
    n = masks.shape[1]
    img_of = idx // n
    n_masked_images = int((masks.sum(1) > 0).sum())
    torch.testing.assert_close(w.sum(), torch.tensor(float(n_masked_images)))
    for img in img_of.unique():
        sel = img_of == img
        torch.testing.assert_close(w[sel].sum(), torch.tensor(1.0))
        assert torch.allclose(w[sel], 1.0 / masks[img].sum().float())


def test_collate_is_deterministic_with_seed() -> None:
    a = collate_multiview(_samples(4), MaskConfig(), 16, rng=5)
    b = collate_multiview(_samples(4), MaskConfig(), 16, rng=5)
    assert torch.equal(a["masks"], b["masks"])


def test_collate_tiny_grid_masks_none_where_the_count_rounds_to_zero() -> None:
    # 32 px crops with patch 16: a 2x2 grid; of 8 crops 4 are "masked" with int(4 * p) = 0, 1, 1, 2 patches:
    # dinov3 masks none in the first (it does not force one); reference: tests/train/test_parity_official.py
    out = collate_multiview(_samples(4, g=32, loc=16), MaskConfig(), patch_size=16, rng=0)
    assert sorted(out["masks"].sum(1).tolist()) == [0, 0, 0, 0, 0, 1, 1, 2]
    assert out["n_masked_patches"] == 4


def test_collate_no_masking_when_probability_zero() -> None:
    out = collate_multiview(_samples(4), MaskConfig(mask_sample_probability=0.0), 16, rng=0)
    assert not out["masks"].any() and out["n_masked_patches"] == 0
    assert out["mask_indices"].numel() == 0 and out["masks_weight"].numel() == 0


def test_collate_rejects_crop_not_multiple_of_patch() -> None:
    with pytest.raises(ConfigError, match="not a multiple of patch size"):
        collate_multiview(_samples(2, g=60), MaskConfig(), patch_size=16, rng=0)


# Reference: dinov3 collate_data_and_cast(mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5) with its
# MaskingGenerator(max_num_patches=0.5 * N), run with facebookresearch/dinov3 @
# 6876159a11b4df116f30f667f8c9888617df0751: sorted per-crop mask counts of one batch (they do not depend on
# the seed) and the total number of masked patches.
OFFICIAL_MASK_COUNTS = {
    (4, 4): ([0, 0, 0, 0, 3, 4, 6, 8], 21),
    (14, 16): ([0] * 16 + [24, 29, 34, 39, 44, 49, 53, 58, 63, 68, 73, 78, 83, 88, 93, 98], 974),
}


@pytest.mark.parametrize(("grid", "b"), sorted(OFFICIAL_MASK_COUNTS))
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_counts_match_official_dinov3(grid: int, b: int, seed: int) -> None:
    counts, total = OFFICIAL_MASK_COUNTS[(grid, b)]
    out = collate_multiview(_samples(b, g=grid * 16, loc=16), MaskConfig(min_ratio=0.1, max_ratio=0.5,
                                                                          mask_sample_probability=0.5),
                            patch_size=16, rng=seed)
    assert sorted(out["masks"].sum(1).tolist()) == counts
    assert out["n_masked_patches"] == total


def _aligned_samples(b: int, n_global: int, g: int = 32) -> list[dict]:
    return [{"global_crops": [torch.rand(1, g, g) for _ in range(n_global)], "local_crops": [],
             "global_channels": list(range(n_global)), "local_channels": [], "aligned": True}
            for _ in range(b)]


@pytest.mark.parametrize(("b", "n_global"), [(4, 2), (5, 3), (3, 6)])
def test_aligned_crops_share_one_mask_per_sample(b: int, n_global: int) -> None:
    cfg = MaskConfig(mask_sample_probability=0.5, min_ratio=0.1, max_ratio=0.5)
    out = collate_multiview(_aligned_samples(b, n_global), cfg, patch_size=8, rng=3)
    masks = out["masks"].view(n_global, b, -1)
    assert out["n_global_crops"] == n_global
    for k in range(1, n_global):  # the same positions in every crop of a sample
        assert torch.equal(masks[k], masks[0])
    assert int(masks[0].any(-1).sum()) == int(b * 0.5)  # the masking rule runs over samples
    # crop-major masked tokens, the same (sample, position) order in every crop
    per_crop = out["n_masked_patches"] // n_global
    rows = out["mask_indices"].view(n_global, per_crop)
    n_patches = out["masks"].shape[-1]
    offsets = torch.arange(n_global)[:, None] * b * n_patches
    assert torch.equal(rows - offsets, (rows - offsets)[:1].expand_as(rows))
    assert out["masks_weight"].shape == (out["n_masked_patches"],)


def test_non_aligned_batches_draw_one_mask_per_crop() -> None:
    cfg = MaskConfig(mask_sample_probability=0.5)
    samples = _aligned_samples(8, 2)
    for s in samples:
        s["aligned"] = False
    out = collate_multiview(samples, cfg, patch_size=8, rng=0)
    assert int(out["masks"].any(-1).sum()) == 8  # int(2B * 0.5) crops masked, not per sample
    plain = [{k: v for k, v in s.items() if k != "aligned"} for s in samples]
    assert torch.equal(collate_multiview(plain, cfg, patch_size=8, rng=0)["masks"], out["masks"])


def test_collate_stacks_gram_teacher_crops_crop_major() -> None:
    samples = _samples(3)
    for i, s in enumerate(samples):
        s["gram_teacher_crops"] = [torch.full((1, 96, 96), float(10 * i + k)) for k in range(2)]
    out = collate_multiview(samples, MaskConfig(), 16, rng=0)
    assert out["gram_teacher_crops"].shape == (6, 1, 96, 96)
    assert [float(x[0, 0, 0]) for x in out["gram_teacher_crops"]] == [0, 10, 20, 1, 11, 21]
