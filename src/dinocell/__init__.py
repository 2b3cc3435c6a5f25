"""dinocell: adapt DINOv3 vision transformers to fluorescence microscopy."""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"


def load_backbone(path: str | os.PathLike[str]) -> Any:
    """The backbone of any saved model (export folder or old ``.safetensors``, run folder, ``.ckpt``, official ``.pth``), eval mode."""
    return load_model(path).backbone


def load_model(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """The backbone plus the preprocessing it was trained with (:func:`dinocell.models.loading.load_model`).

    ``m = dinocell.load_model(path)``; ``m.backbone(m.preprocess(raw_field))`` embeds each channel.
    """
    from dinocell.models.loading import load_model as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "load_backbone", "load_model"]
