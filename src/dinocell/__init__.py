"""dinocell: adapt DINOv3 vision transformers to fluorescence microscopy."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_backbone(path: str) -> Any:
    """Load an exported dinocell backbone (``.safetensors`` + JSON sidecar) as a ready model."""
    from dinocell.models.backbone import load_backbone as _load

    return _load(path)


__all__ = ["__version__", "load_backbone"]
