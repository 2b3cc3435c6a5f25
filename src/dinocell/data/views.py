"""Multi-view multi-crop augmentation for Cell Painting fields.

A Cell Painting field has C stain channels that show *the same cells*.  To make a ViT's features
independent of which stain it looks at, every training sample pairs different "views" of one field:

* global crop 1: the mean of the fluorescent channels (a stable, stain-agnostic anchor);
* global crop 2: one fluorescent channel chosen uniformly at random;
* local crops: the mean view with probability ``cfg.local_mean_prob``, otherwise a random channel.

The DINO loss then asks the student to map every view onto the teacher's prediction from the other
global view, which is exactly a cross-channel consistency objective.  ``policy: single_view`` builds
every crop from the mean image: the plain single-image DINO baseline used for comparison.

Policies that aim at the field×channel residual (issue #12):

* ``channel_pairs``: the two globals are two *different* single fluorescent channels (no mean
  anchor); ``mean_global: true`` adds the fluorescent mean as a third global;
* ``all_channels``: every fluorescent channel of one aligned box is a global crop, plus the mean,
  each teaching all the others;
* ``aligned_globals: true`` (implied by ``all_channels``): all globals share one crop box and one
  flip, so they differ only in channel and photometric jitter.  Their patch grids then line up
  position by position, which cross-channel iBOT needs.

Every crop is one channel (``1×S×S`` float32), so the backbone runs with ``in_chans=1`` whatever the
number of stains.  No RGB or ImageNet statistics are assumed: the input field is already scaled per
channel to [0, 1] (``dinocell.data.decode.scale_field``).

Speed: a JUMP field is 5×1080×1080, while a crop is at most 224².  Each crop box is drawn first, only
the needed channel(s) inside that box are read (the mean is computed inside the box only), and the
small crop is resized with antialiased bilinear interpolation; intensity augmentations then run on
the S×S crop.  Nothing touches the full-resolution field as a whole per crop.

Gram anchoring with a frozen Gram teacher (``loss.gram_weight > 0``, ``loss.gram_target=gram_teacher``) adds
``gram_teacher_crops``: for each global crop, the same box of the same channel with the same flips, resized to
``data.views.gram_teacher_crop_size`` (default twice the global crop, dinov3's 512 for 256) and *undistorted*
(no jitter, blur or solarisation; dinov3 ``crops.gram_teacher_no_distortions``).  The Gram teacher reads them
and its patch grid is resized back to the student's (``MultiViewDINO.forward``).  They take no random draws,
so a seeded sample's other crops are the same with and without them.

Randomness comes only from the optional ``torch.Generator`` (or torch's default generator), so a
seeded generator reproduces a sample exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinocell.config import VIEW_POLICIES, LossConfig, ViewsConfig
from dinocell.errors import ConfigError, DataError

#: Channel id of a crop made from the mean of the fluorescent channels.
MEAN_VIEW = -1

_CHANNEL_POOLS = ("fluorescent", "all")


def _uniform(g: torch.Generator | None, lo: float, hi: float) -> float:
    """One float uniform in [lo, hi) drawn from ``g`` (torch's default generator when None)."""
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator | None, lo: int, hi: int) -> int:
    """One int uniform in [lo, hi) drawn from ``g``."""
    return int(torch.randint(lo, hi, (1,), generator=g))


def random_resized_crop_box(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """A random crop box ``(top, left, h, w)`` covering ``scale`` of the area with aspect ``ratio``.

    Same sampling rule as torchvision's ``RandomResizedCrop`` (10 tries, then a centre crop with the
    aspect ratio clamped into range), but driven by ``generator`` so that samples are reproducible.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(generator, 0, height - h + 1)
            left = _randint(generator, 0, width - w + 1)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a 2-D crop to ``size×size`` (antialiased bilinear, so downscaling does not alias)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img.clone(memory_format=torch.contiguous_format)  # never alias the caller's field
    out = F.interpolate(img[None, None], size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0, 0]


def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a 2-D image with reflect padding.

    The kernel radius is ``ceil(3·sigma)`` pixels of the *output crop*, capped so the kernel never
    exceeds the crop itself (tiny test crops).  ``sigma`` is in crop pixels, as in DINO, which blurs
    after resizing to 224/96.
    """
    size = min(img.shape)
    radius = min(int(math.ceil(3.0 * sigma)), (size - 1) // 2)
    if radius < 1:
        return img
    k = _gaussian_kernel(sigma, radius)
    x = img[None, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return x[0, 0]


def gram_crop_size(views: ViewsConfig, loss: LossConfig) -> int | None:
    """Side of the Gram teacher's own global crops, or None when there is no frozen Gram teacher to read
    them (Gram off, ``loss.gram_target=ema``) or ``data.views.gram_teacher_crop_size`` is 0 (the Gram
    teacher then reads the student's crops).  Unset: twice the global crop, dinov3's 512 for 256."""
    if loss.gram_weight <= 0 or loss.gram_target != "gram_teacher":
        return None
    size = views.gram_teacher_crop_size
    if size is None:
        return 2 * views.global_crop_size
    return size or None


def crop_scaled_batch_size(batch_size: int, n_global_crops: int) -> int:
    """Per-device batch that keeps a step's global-crop count that of two globals per sample
    (``data.views.scale_batch_to_crops``): ``batch × 2 / G``, at least 1."""
    return max(1, (batch_size * 2) // max(1, n_global_crops))


class MultiViewAugmentation:
    """Turn one C×H×W field into DINO's multi-crop sample with one channel per crop.

    Args:
        cfg: crop sizes, scales and augmentation probabilities (``ViewsConfig``).
        fluorescent: one flag per input channel; brightfield channels (False) never enter the mean
            view and, by default, are never chosen as single-channel views.
        single_channel_from: ``"fluorescent"`` (default) draws single-channel views uniformly among
            the fluorescent channels; ``"all"`` draws among every channel, brightfield included.
        ratio: aspect-ratio range of the random resized crops.
        gram_crop_size: side of the undistorted ``gram_teacher_crops`` (:func:`gram_crop_size`); None: none.

    Returns from ``__call__`` a dict with ``global_crops`` (``n_global_crops`` tensors ``1×G×G``: 2, or
    3 for ``channel_pairs`` with ``mean_global``, or fluorescent channels + 1 for ``all_channels``),
    ``local_crops`` (``n_local_crops`` tensors ``1×L×L``), ``global_channels`` and ``local_channels``
    (channel index of each crop, ``-1`` for the mean view), ``aligned`` (the globals share a box) and, with
    ``gram_crop_size``, ``gram_teacher_crops`` (one ``1×S×S`` undistorted crop per global crop).
    """

    def __init__(
        self,
        cfg: ViewsConfig,
        fluorescent: Sequence[bool],
        *,
        single_channel_from: str = "fluorescent",
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        gram_crop_size: int | None = None,
    ) -> None:
        if cfg.policy not in VIEW_POLICIES:  # a ViewsConfig built by hand, not loaded by the engine
            raise ConfigError(f"config key 'data.views.policy' must be one of {', '.join(VIEW_POLICIES)}; "
                              f"got '{cfg.policy}'")
        if single_channel_from not in _CHANNEL_POOLS:
            raise ConfigError(f"single_channel_from must be one of {', '.join(_CHANNEL_POOLS)}; "
                              f"got '{single_channel_from}'")
        for key, rng in (("global_scale", cfg.global_scale), ("local_scale", cfg.local_scale)):
            if len(rng) != 2 or not 0 < rng[0] <= rng[1] <= 1:
                raise ConfigError(f"config key 'data.views.{key}' must be [min, max] with 0<min<=max<=1")
        if cfg.global_crop_size < 1 or cfg.local_crop_size < 1 or cfg.n_local_crops < 0:
            raise ConfigError("config keys 'data.views.*_crop_size' must be >= 1 and n_local_crops >= 0")
        if gram_crop_size is not None and gram_crop_size < 1:
            raise ConfigError("config key 'data.views.gram_teacher_crop_size' must be >= 1, 0 (off) or null")
        flags = [bool(f) for f in fluorescent]
        if not any(flags):
            raise DataError(f"multi-view augmentation needs at least one fluorescent channel; "
                            f"all {len(flags)} channels are brightfield")
        self.cfg = cfg
        self.fluorescent = flags
        self.n_channels = len(flags)
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self._fluo_idx = [i for i, f in enumerate(flags) if f]
        # A contiguous run of fluorescent channels can be sliced instead of gathered (no copy).
        lo, hi = self._fluo_idx[0], self._fluo_idx[-1] + 1
        self._fluo_slice = slice(lo, hi) if hi - lo == len(self._fluo_idx) else None
        self._fluo_tensor = torch.tensor(self._fluo_idx, dtype=torch.long)
        self._pool = self._fluo_idx if single_channel_from == "fluorescent" else list(range(len(flags)))
        if cfg.policy in ("channel_pairs", "all_channels") and len(self._fluo_idx) < 2:
            raise ConfigError(f"data.views.policy={cfg.policy} needs at least two fluorescent channels; "
                              f"this source has {len(self._fluo_idx)}")
        self.aligned = cfg.aligned_globals or cfg.policy == "all_channels"
        self.gram_crop_size = gram_crop_size

    @property
    def n_global_crops(self) -> int:
        """Global crops per sample under this policy (fixed: a batch stacks them crop-major)."""
        c = self.cfg
        if c.policy == "all_channels":
            return len(self._fluo_idx) + 1
        if c.policy == "channel_pairs" and c.mean_global:
            return 3
        return 2

    # ----------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        c = self.cfg
        gram = f", gram={self.gram_crop_size}" if self.gram_crop_size else ""
        return (f"MultiViewAugmentation(policy={c.policy}, channels={self.n_channels}, "
                f"fluorescent={len(self._fluo_idx)}, global={c.global_crop_size}, "
                f"local={c.n_local_crops}x{c.local_crop_size}{gram})")

    def _pick_channel(self, g: torch.Generator | None) -> int:
        return self._pool[_randint(g, 0, len(self._pool))]

    def _global_channels(self, g: torch.Generator | None) -> list[int]:
        """The channel of each global crop under the policy (``MEAN_VIEW`` for the mean)."""
        c = self.cfg
        if c.policy == "single_view":
            return [MEAN_VIEW, MEAN_VIEW]
        if c.policy == "multiview":
            return [MEAN_VIEW, self._pick_channel(g)]
        if c.policy == "all_channels":
            return [*self._fluo_idx, MEAN_VIEW]
        a = self._fluo_idx[_randint(g, 0, len(self._fluo_idx))]
        others = [i for i in self._fluo_idx if i != a]
        pair = [a, others[_randint(g, 0, len(others))]]
        return [*pair, MEAN_VIEW] if c.mean_global else pair

    def _photometric(self, k: int) -> tuple[float, float]:
        """(blur, solarize) probabilities of global crop ``k``: DINO's asymmetric pair, repeated."""
        c = self.cfg
        return (c.blur_prob_global1, 0.0) if k % 2 == 0 else (c.blur_prob_global2, c.solarize_prob_global2)

    def _channel_image(self, box: torch.Tensor, channel: int) -> torch.Tensor:
        if channel != MEAN_VIEW:
            return box[channel]
        if self._fluo_slice is not None:
            return box[self._fluo_slice].mean(0)
        return box.index_select(0, self._fluo_tensor).mean(0)

    def _box(self, field: torch.Tensor, scale: Sequence[float], g: torch.Generator | None) -> torch.Tensor:
        """A random box of every channel (a view of ``field``: only the needed channels are read later)."""
        _, height, width = field.shape
        top, left, h, w = random_resized_crop_box(height, width, scale, self.ratio, g)
        return field[:, top:top + h, left:left + w]

    def _draw_flips(self, g: torch.Generator | None) -> tuple[bool, bool]:
        c = self.cfg
        hflip = c.hflip_prob > 0 and _uniform(g, 0, 1) < c.hflip_prob
        vflip = c.vflip_prob > 0 and _uniform(g, 0, 1) < c.vflip_prob
        return hflip, vflip

    @staticmethod
    def _flip(img: torch.Tensor, flips: tuple[bool, bool]) -> torch.Tensor:
        if flips[0]:
            img = img.flip(-1)
        if flips[1]:
            img = img.flip(-2)
        return img

    def _gram_crop(self, image: torch.Tensor, flips: tuple[bool, bool]) -> torch.Tensor:
        """The Gram teacher's crop: the student's box and flips at ``gram_crop_size``, no photometry."""
        assert self.gram_crop_size is not None
        return self._flip(_resize(image, self.gram_crop_size), flips).to(torch.float32).contiguous().unsqueeze(0)

    def _aligned_globals(self, field: torch.Tensor, channels: list[int], g: torch.Generator | None,
                         gram: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Global crops that share one box and one flip: they differ only in channel and photometry,
        so patch ``p`` of every crop shows the same cells.  ``gram`` collects their Gram-teacher crops."""
        c = self.cfg
        box = self._box(field, c.global_scale, g)
        flips = self._draw_flips(g)
        crops = []
        for k, ch in enumerate(channels):
            image = self._channel_image(box, ch)
            img = self._flip(_resize(image, c.global_crop_size), flips)
            blur_p, solarize_p = self._photometric(k)
            img = self._augment(img, blur_p, solarize_p, g, flips=False)
            crops.append(img.to(torch.float32).contiguous().unsqueeze(0))
            if gram is not None:
                gram.append(self._gram_crop(image, flips))
        return crops

    def _augment(self, img: torch.Tensor, blur_p: float, solarize_p: float,
                 g: torch.Generator | None, flips: bool = True) -> torch.Tensor:
        """Flips (unless the caller applied shared ones), brightness/contrast jitter, blur and
        solarisation on one S×S crop (values in [0,1])."""
        c = self.cfg
        if flips:
            img = self._flip(img, self._draw_flips(g))
        if c.jitter_prob > 0 and (c.brightness > 0 or c.contrast > 0) and _uniform(g, 0, 1) < c.jitter_prob:
            b = _uniform(g, max(0.0, 1 - c.brightness), 1 + c.brightness)
            k = _uniform(g, max(0.0, 1 - c.contrast), 1 + c.contrast)
            brightness_first = _uniform(g, 0, 1) < 0.5  # random order, as torchvision's ColorJitter
            if brightness_first:
                img = (img * b).clamp_(0, 1)
            m = img.mean()
            img = ((img - m) * k + m).clamp_(0, 1)
            if not brightness_first:
                img = (img * b).clamp_(0, 1)
        if blur_p > 0 and _uniform(g, 0, 1) < blur_p:
            img = gaussian_blur(img, _uniform(g, 0.1, 2.0))
        if solarize_p > 0 and _uniform(g, 0, 1) < solarize_p:
            img = torch.where(img >= 0.5, 1.0 - img, img)
        return img

    def _view(self, field: torch.Tensor, channel: int, scale: Sequence[float], size: int, blur_p: float,
              solarize_p: float, g: torch.Generator | None, gram: list[torch.Tensor] | None = None) -> torch.Tensor:
        """One crop: a random box of the needed channel(s) only, resized small, then flips and photometry.
        ``gram`` (global crops with a Gram teacher) collects the same box and flips, undistorted."""
        image = self._channel_image(self._box(field, scale, g), channel)
        flips = self._draw_flips(g)
        img = self._flip(_resize(image, size), flips)
        img = self._augment(img, blur_p, solarize_p, g, flips=False)
        if gram is not None:
            gram.append(self._gram_crop(image, flips))
        return img.to(torch.float32).contiguous().unsqueeze(0)

    # ----------------------------------------------------------------------------------------------
    def __call__(self, field: torch.Tensor | np.ndarray,
                 generator: torch.Generator | None = None) -> dict[str, Any]:
        """One multi-crop sample from a C×H×W field already scaled to [0, 1]."""
        if isinstance(field, np.ndarray):
            field = torch.from_numpy(field)
        if not isinstance(field, torch.Tensor) or field.ndim != 3:
            shape = tuple(field.shape) if hasattr(field, "shape") else type(field).__name__
            raise DataError(f"multi-view augmentation expects a C×H×W field, got {shape}")
        if field.shape[0] != self.n_channels:
            raise DataError(f"field has {field.shape[0]} channels but {self.n_channels} channel flags "
                            f"were given")
        if field.dtype != torch.float32:
            field = field.to(torch.float32)
        c, g = self.cfg, generator
        mixed_locals = c.policy != "single_view"
        gram: list[torch.Tensor] | None = [] if self.gram_crop_size else None
        if c.policy in ("multiview", "single_view") and not self.aligned:
            # The seed's draw order, kept exactly so seeded runs reproduce earlier results.
            ch1 = MEAN_VIEW
            global1 = self._view(field, ch1, c.global_scale, c.global_crop_size, c.blur_prob_global1, 0.0, g, gram)
            ch2 = self._pick_channel(g) if c.policy == "multiview" else MEAN_VIEW
            global2 = self._view(field, ch2, c.global_scale, c.global_crop_size, c.blur_prob_global2,
                                 c.solarize_prob_global2, g, gram)
            global_crops, global_channels = [global1, global2], [ch1, ch2]
        else:
            global_channels = self._global_channels(g)
            if self.aligned:
                global_crops = self._aligned_globals(field, global_channels, g, gram)
            else:
                global_crops = [self._view(field, ch, c.global_scale, c.global_crop_size, *self._photometric(k), g,
                                           gram)
                                for k, ch in enumerate(global_channels)]
        local_crops: list[torch.Tensor] = []
        local_channels: list[int] = []
        for _ in range(c.n_local_crops):
            if mixed_locals and _uniform(g, 0, 1) >= c.local_mean_prob:
                ch = self._pick_channel(g)
            else:
                ch = MEAN_VIEW
            local_crops.append(self._view(field, ch, c.local_scale, c.local_crop_size, c.blur_prob_local,
                                          0.0, g))
            local_channels.append(ch)
        out: dict[str, Any] = {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "global_channels": global_channels,
            "local_channels": local_channels,
            "aligned": self.aligned,
        }
        if gram is not None:
            out["gram_teacher_crops"] = gram
        return out
