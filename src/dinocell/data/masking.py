"""iBOT block masking and the multi-crop collate function.

iBOT (Zhou et al., 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer") trains the student to
predict the teacher's patch tokens at masked positions.  Masks are unions of random rectangles
(BEiT-style blocks, Bao et al., 2022) rather than scattered patches: neighbouring patches are highly
correlated, so masking single patches would let the student copy from its neighbours.

As in DINOv2/DINOv3, only a fraction of the global crops (``mask_sample_probability``) is masked, and
the masked crops get ratios spread evenly over ``[min_ratio, max_ratio]`` so every batch sees both
light and heavy masking: the i-th masked crop holds ``int(N * p_{i+1})`` patches, the upper edge of its
bin of ``p = torch.linspace(min_ratio, max_ratio, n + 1)`` (dinov3 ``collate_data_and_cast``, with
torch's float32 linspace: numpy's rounds differently, e.g. 2901 instead of dinov3's 2900 masked patches
for 98 crops of 14x14; with the random completion the count is exact, so a batch's masked-patch total is
fixed by its size).  On tiny grids a bin whose count rounds to 0 masks nothing, as upstream.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from dinocell.config import MaskConfig
from dinocell.errors import ConfigError, DataError


class BlockMaskGenerator:
    """Random rectangular block masks on a ``grid = (h, w)`` of patches.

    Blocks have an area of at least ``min_num_patches`` and at most ``max_num_patches`` (default: half
    the grid, as DINOv2) and a log-uniform aspect ratio in ``[min_aspect, max_aspect]``.  Blocks are
    added until the requested count is reached or ten tries in a row add nothing.  With
    ``complete_randomly`` (default, DINOv3 behaviour) any shortfall is then filled with random single
    patches, so the mask holds *exactly* the requested number of patches; with it off the mask is
    made of blocks only and may hold a few patches less.
    """

    def __init__(
        self,
        grid: tuple[int, int] | int,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float = 3.3,
        *,
        max_num_patches: int | None = None,
        complete_randomly: bool = True,
    ) -> None:
        if isinstance(grid, int):
            grid = (grid, grid)
        self.height, self.width = int(grid[0]), int(grid[1])
        if self.height < 1 or self.width < 1:
            raise ConfigError(f"mask grid must be positive, got {grid}")
        if not 0 < min_aspect <= max_aspect:
            raise ConfigError(f"mask aspect range must satisfy 0 < min <= max, got [{min_aspect}, {max_aspect}]")
        self.num_patches = self.height * self.width
        self.min_num_patches = max(1, int(min_num_patches))
        self.max_num_patches = (int(0.5 * self.num_patches) if max_num_patches is None
                                else int(max_num_patches))
        self.max_num_patches = max(self.max_num_patches, self.min_num_patches)
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.complete_randomly = complete_randomly

    def __repr__(self) -> str:
        return (f"BlockMaskGenerator(grid=({self.height}, {self.width}), block=[{self.min_num_patches}, "
                f"{self.max_num_patches}], aspect=[{math.exp(self.log_aspect[0]):.2f}, "
                f"{math.exp(self.log_aspect[1]):.2f}])")

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try (10 times) to add one block that adds 1..``budget`` new patches; return how many it added."""
        hi = max(self.min_num_patches, min(budget, self.max_num_patches))
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, hi) if hi > self.min_num_patches else hi
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < 1 or w < 1 or h > self.height or w > self.width or h * w < self.min_num_patches:
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            window = mask[top:top + h, left:left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[...] = True
                return new
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """A bool ``(h, w)`` mask with ``num_masking_patches`` patches set (see class doc)."""
        rng = np.random.default_rng() if rng is None else rng
        target = int(min(max(num_masking_patches, 0), self.num_patches))
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < target:
            added = self._add_block(mask, target - count, rng)
            if added == 0:
                break
            count += added
        if self.complete_randomly and count < target:
            free = np.flatnonzero(~mask.reshape(-1))
            pick = rng.choice(free, size=target - count, replace=False)
            mask.reshape(-1)[pick] = True
        return mask


def _is_scalar(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.ndim == 0
    if isinstance(v, np.ndarray):
        return v.ndim == 0 and v.dtype.kind in "biuf"
    return isinstance(v, (numbers.Number, np.generic)) and not isinstance(v, complex)


_CROP_KEYS = ("global_crops", "local_crops", "global_channels", "local_channels", "gram_teacher_crops")


def collate_multiview(
    samples: list[dict[str, Any]],
    mask_cfg: MaskConfig,
    patch_size: int,
    rng: np.random.Generator | int | None = None,
) -> dict[str, Any]:
    """Stack multi-crop samples crop-major and draw iBOT masks for the global crops.

    Crop-major means ``global_crops[k * B + b]`` is crop ``k`` of sample ``b`` (so the first B rows are
    every sample's mean view).  Of the ``2B`` global crops, ``int(2B * mask_sample_probability)`` get
    a block mask; their ratios are spread over ``[min_ratio, max_ratio]``: the i-th masked crop gets
    ``int(N * p_{i+1})`` of the N patches, with ``p = torch.linspace(min_ratio, max_ratio, n + 1)`` in
    float32 as dinov3 computes it (0 patches when that rounds to 0 on tiny grids, as dinov3).  The masks
    are then shuffled over the crops.  When the samples are ``aligned`` (their globals share one box), the same rule runs over the
    B samples instead, and every global crop of a sample gets that sample's mask.  ``masks_weight``
    gives each masked patch ``1/(masked patches of its image)`` so every masked image counts equally
    in the iBOT loss.  ``n_global_crops`` records G for the meta-architecture.

    Extra per-sample keys: numeric scalars (``label``, ``index`` ...) are stacked into tensors; any
    other value is passed through as a list.
    """
    if not samples:
        raise DataError("cannot collate an empty batch")
    if isinstance(rng, (int, np.integer)) or rng is None:
        rng = np.random.default_rng(rng)
    b = len(samples)
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    for s in samples:
        if len(s["global_crops"]) != n_global or len(s["local_crops"]) != n_local:
            raise DataError("all samples in a batch need the same number of global and local crops")

    out: dict[str, Any] = {}
    out["global_crops"] = torch.stack([s["global_crops"][k] for k in range(n_global) for s in samples])
    out["global_channels"] = torch.tensor(
        [int(s["global_channels"][k]) for k in range(n_global) for s in samples], dtype=torch.long)
    if n_local:
        out["local_crops"] = torch.stack([s["local_crops"][k] for k in range(n_local) for s in samples])
    else:
        g = out["global_crops"]
        out["local_crops"] = g.new_zeros((0, *g.shape[1:2], 0, 0))
    out["local_channels"] = torch.tensor(
        [int(s["local_channels"][k]) for k in range(n_local) for s in samples], dtype=torch.long)
    if "gram_teacher_crops" in samples[0]:  # dinov3: the Gram teacher's own (larger) view of each global crop
        out["gram_teacher_crops"] = torch.stack(
            [s["gram_teacher_crops"][k] for k in range(n_global) for s in samples])

    height, width = out["global_crops"].shape[-2:]
    if height % patch_size or width % patch_size:
        raise ConfigError(f"global crop size {height}x{width} is not a multiple of patch size {patch_size}")
    grid = (height // patch_size, width // patch_size)
    n_patches = grid[0] * grid[1]
    n_images = n_global * b
    generator = BlockMaskGenerator(grid, mask_cfg.min_num_patches, mask_cfg.min_aspect,
                                   mask_cfg.max_aspect)

    aligned = bool(samples[0].get("aligned", False))
    # Aligned globals show the same cells at the same patch positions: one mask per *sample*, shared by
    # all its global crops, so every crop's masked tokens are the same (sample, position) list in the
    # same order (crop-major), which cross-channel iBOT needs.  Otherwise one mask per crop (dinov3).
    n_units = b if aligned else n_images
    n_masked = int(n_units * mask_cfg.mask_sample_probability)
    probs = torch.linspace(mask_cfg.min_ratio, mask_cfg.max_ratio, n_masked + 1)  # float32, as dinov3
    masks: list[np.ndarray] = []
    for i in range(n_masked):
        count = int(n_patches * probs[i + 1])  # upper edge of the bin: a float32 product, as dinov3
        masks.append(generator(count, rng).reshape(-1))
    masks.extend(np.zeros(n_patches, dtype=bool) for _ in range(n_units - n_masked))
    order = rng.permutation(n_units)
    mask_tensor = torch.from_numpy(np.stack([masks[i] for i in order]))
    if aligned:
        mask_tensor = mask_tensor.repeat(n_global, 1)  # row k * B + b: sample b's mask, every crop k

    per_image = mask_tensor.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)
    out["masks"] = mask_tensor
    out["mask_indices"] = mask_tensor.reshape(-1).nonzero().reshape(-1)
    out["masks_weight"] = (1.0 / per_image).expand_as(mask_tensor)[mask_tensor]
    out["n_masked_patches"] = int(out["mask_indices"].numel())
    out["n_global_crops"] = n_global

    for key in samples[0]:
        if key in _CROP_KEYS:
            continue
        values = [s.get(key) for s in samples]
        if all(_is_scalar(v) for v in values):
            out[key] = torch.stack([torch.as_tensor(v) for v in values])
        else:
            out[key] = values
    return out
