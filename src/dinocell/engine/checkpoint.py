"""Checkpoint I/O of a run folder, shared by ``pretrain`` and ``segment fit``: atomic writes, keep-last-N,
safe loading, compatibility checks.

* Writes go through :func:`dinocell.paths.write_atomic` (``<name>.tmp`` + rename): a killed run never
  leaves a half-written file, a full disk is one line.
* Reads use :func:`dinocell.models.weights.load_weights_file` (``weights_only=True``): a checkpoint
  cannot run code.  File names come from :mod:`dinocell.runs`.
* :func:`prune_checkpoints` keeps the newest ``train.keep_last_n`` ``stepN.ckpt`` files by step.  It runs
  when a run starts and after every save, so orphans of an interrupted run (``stepN.ckpt`` beyond N,
  ``*.tmp``, Lightning's ``-v1`` copies) do not pile up.
* :func:`check_resume` and :func:`check_config_matches_tensors` turn a mismatched checkpoint into one
  line that names what differs (config keys, tensor widths, missing/unexpected keys).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from dinocell.config import RETIRED_DATA_KEYS
from dinocell.errors import UserError
from dinocell.models.weights import load_weights_file, state_mismatch
from dinocell.paths import payload_bytes, write_atomic
from dinocell.runs import LAST, STEP_NAME

log = logging.getLogger(__name__)

#: Config sections that define the network: a resume with other values cannot load the tensors.
ARCH_SECTIONS = ("model", "head")
#: Architecture keys that may differ on resume (they only matter when the run starts from scratch).
_ARCH_FREE = {"model.pretrained", "model.act_checkpointing", "model.drop_path_rate", "model.layerscale_init"}


def load_checkpoint_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; anything that would run code is refused."""
    return load_weights_file(path, "checkpoint", map_location)


def prune_checkpoints(ckpt_dir: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``stepN.ckpt`` files, plus ``*.tmp`` leftovers and versioned
    copies (``step..-v1.ckpt``, ``last-v1.ckpt``); ``last.ckpt`` is never touched.  Returns what went."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    steps: list[tuple[int, Path]] = []
    doomed: list[Path] = []
    for p in d.iterdir():
        if not p.is_file() or p.name == LAST:
            continue
        m = STEP_NAME.fullmatch(p.name)
        if m:
            steps.append((int(m.group(1)), p))
        elif p.name.endswith(".tmp") or re.fullmatch(r".+-v\d+\.ckpt", p.name):
            doomed.append(p)
    steps.sort(reverse=True)
    doomed += [p for _, p in steps[max(1, keep):]]
    removed = []
    for p in doomed:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    if removed:
        log.debug("pruned %d checkpoint file(s) in %s", len(removed), d)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write atomically (:func:`dinocell.paths.write_atomic`), prune to the newest ``keep_last_n``; read
    with ``weights_only=True``.  Lightning calls ``save_checkpoint`` on rank 0 only."""

    def __init__(self, keep_last_n: int = 3) -> None:
        super().__init__()
        self.keep_last_n = keep_last_n

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        p = Path(path)
        write_atomic(p, lambda tmp: torch.save(checkpoint, tmp), needed=payload_bytes(checkpoint))
        prune_checkpoints(p.parent, self.keep_last_n)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location or "cpu")


# ----------------------------------------------------------------------------------- compatibility


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(stored: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...] = ARCH_SECTIONS,
                ignore: set[str] | frozenset[str] = frozenset(_ARCH_FREE)) -> list[str]:
    """``key=stored -> current`` for every differing leaf of ``sections`` (dotted names, sorted)."""
    a = _flatten({s: stored.get(s, {}) for s in sections})
    b = _flatten({s: current.get(s, {}) for s in sections})
    return [f"{k}={a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def _backbone_prefix(state: dict[str, torch.Tensor]) -> str | None:
    for prefix in ("meta.teacher.backbone.", "meta.student.backbone.", ""):
        if f"{prefix}model.patch_embed.proj.weight" in state:
            return prefix
    return None


def tensor_facts(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """What the tensors say about the architecture: ``model.embed_dim``, ``model.depth``,
    ``model.patch_size``, ``model.in_chans`` (backbone) and ``head.prototypes`` (DINO head)."""
    facts: dict[str, int] = {}
    prefix = _backbone_prefix(state)
    if prefix is not None:
        w = state[f"{prefix}model.patch_embed.proj.weight"]  # (D, C, p, p)
        facts.update({"model.embed_dim": int(w.shape[0]), "model.in_chans": int(w.shape[1]),
                      "model.patch_size": int(w.shape[-1])})
        blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"model\.blocks\.(\d+)\.", k))}
        if blocks:
            facts["model.depth"] = max(blocks) + 1
    for key, v in state.items():
        if ".dino_head.last_layer." in key and key.endswith(("weight", "original1")) and v.ndim == 2:
            facts["head.prototypes"] = int(v.shape[0])
            break
    return facts


def check_config_matches_tensors(config: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> None:
    """Fail in one line when a checkpoint's stored config disagrees with its own tensors
    (e.g. ``model.embed_dim=192`` stored but 384-wide tensors): the file was edited or mixed up."""
    flat = _flatten({s: config.get(s, {}) for s in ARCH_SECTIONS})
    bad = [f"{k}={flat[k]} but the tensors say {v}" for k, v in tensor_facts(state).items()
           if flat.get(k) is not None and flat[k] != v]
    if bad:
        raise UserError(f"checkpoint {source}: its stored config disagrees with its tensors ({'; '.join(bad)})")


def check_compatible(module_state: dict[str, torch.Tensor], ckpt_state: dict[str, torch.Tensor], source: str,
                     stored_config: dict[str, Any] | None = None,
                     run_config: dict[str, Any] | None = None) -> None:
    """Fail in one line when a checkpoint belongs to another architecture: the config keys that differ
    (when both configs are given) and the missing / unexpected / mis-shaped tensors."""
    if stored_config is not None:
        check_config_matches_tensors(stored_config, ckpt_state, source)
    mismatch = state_mismatch(module_state, ckpt_state)
    diff = config_diff(stored_config, run_config) if stored_config is not None and run_config is not None else []
    if mismatch or diff:
        parts = ([f"config differs: {', '.join(diff)}"] if diff else []) + mismatch
        raise UserError(f"checkpoint {source} does not match this model's architecture ({'; '.join(parts)}); "
                        "use --no-resume or another --output-dir")


def check_resume(module_state: dict[str, torch.Tensor], checkpoint: dict[str, Any], run_config: dict[str, Any],
                 source: str = LAST) -> None:
    """Everything a resume must agree on; other config differences are logged (lr, data, ...)."""
    stored = checkpoint.get("dinocell", {}).get("config")
    check_compatible(module_state, checkpoint.get("state_dict", {}), source, stored, run_config)
    if stored:
        # the held-out wells come from the run record; older checkpoints also hold its counts (retired keys)
        other = config_diff(stored, run_config, sections=("data", "loss", "optim"),
                            ignore={"data.holdout.wells", *RETIRED_DATA_KEYS})
        if other:
            log.warning("resuming %s with a different config: %s", source, "; ".join(other[:6]))
