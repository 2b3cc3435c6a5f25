"""The one safe ``torch.load`` and the one state-dict fit check.

Every ``.ckpt`` / ``.pth`` dinocell reads (training checkpoints, segmentation checkpoints, official DINOv3
releases) goes through :func:`load_weights_file`: ``weights_only=True``, so a file cannot run code, and
whatever goes wrong is one :class:`UserError` line.  Every strict load of tensors into a module is
checked first by :func:`state_mismatch` / :func:`check_state_fits`, so a file of another architecture
names the missing / unexpected / mis-shaped keys instead of printing torch's page-long ``RuntimeError``.

It lives in ``models`` (the lowest layer that holds weights) so the loader, the backbone and the
``engine`` checkpoint I/O above it all share it.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dinocell.errors import UserError


def _load_detail(err: BaseException) -> str:
    """The informative line of torch's multi-paragraph weights_only error (e.g. the blocked GLOBAL)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or ln.startswith("Unsupported"):
            return ln
    return lines[0] if lines else type(err).__name__


def load_weights_file(path: str | os.PathLike[str], what: str = "checkpoint",
                      map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` as a dict; ``what`` names the file in the one-line errors
    (``checkpoint``, ``pretrained weights``).  A pickle that would run code is refused."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses pickles that import or call anything
        raise UserError(f"refusing to load {p}: not a plain weights file "
                        f"(torch.load weights_only=True: {_load_detail(e)})") from None
    except Exception as e:  # truncated, not a torch file, unreadable
        raise UserError(f"cannot read {what} {p}: {type(e).__name__}: {_load_detail(e)}") from None
    if not isinstance(obj, Mapping):
        raise UserError(f"{p} does not hold a state dict (got {type(obj).__name__})")
    return dict(obj)


def state_mismatch(expected: Mapping[str, Any], state: Mapping[str, Any], shown: int = 3) -> list[str]:
    """What keeps ``state`` from loading strictly where ``expected`` is (a module's ``state_dict()``):
    ``N missing keys (a, b, c, ...)``, ``N unexpected keys (...)``, ``N shape-mismatched keys (k (..) vs (..))``;
    empty when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", shapes)):
        if items:
            more = ", ..." if len(items) > shown else ""
            parts.append(f"{len(items)} {label} keys ({', '.join(items[:shown])}{more})")
    return parts


def check_state_fits(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str,
                     target: str = "this model") -> None:
    """Raise one ``UserError`` line (``weights in <what> do not fit <target>: ...``) unless ``state``
    loads strictly into ``module``."""
    parts = state_mismatch(module.state_dict(), state)
    if parts:
        raise UserError(f"weights in {what} do not fit {target}: " + "; ".join(parts))


def load_state_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str,
                       target: str = "this model") -> None:
    """:func:`check_state_fits`, then the strict load."""
    check_state_fits(module, state, what, target)
    module.load_state_dict(dict(state), strict=True)


__all__ = ["check_state_fits", "load_state_checked", "load_weights_file", "state_mismatch"]
