"""Moved: :func:`dinocell.models.encode.encode_features` (models sits below evaluate and extract).

Kept as a re-export until ``extract/volumes.py``, ``extract/__init__.py`` and
``benchmarks/bench_features.py`` import ``dinocell.models.encode`` directly; then delete this file.
"""

from __future__ import annotations

from dinocell.models.encode import POOLS, encode_features

__all__ = ["POOLS", "encode_features"]
