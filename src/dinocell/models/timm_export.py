"""The one export format: a timm model folder, ``config.json`` + ``model.safetensors`` (+ ``dinocell.safetensors``).

``dinocell export`` writes it (:func:`save_timm`, the one writer); ``timm.create_model("local-dir:DIR",
pretrained=True)`` (or any timm name with ``pretrained_cfg_overlay=dict(file=DIR/model.safetensors)``)
rebuilds the backbone from such a folder with no dinocell installed, and the same folder can be pushed
to the Hugging Face Hub as is (``hf-hub:user/name``).  The two timm files are written by timm's own
``save_for_hf`` so the layout follows timm's format as it evolves.

What the model expects as input travels in ``pretrained_cfg``: ``input_size`` = (in_chans, crop,
crop) with the training crop, ``mean`` 0 / ``std`` 1 (inputs are already in [0, 1]: no ImageNet
normalisation), a ``description`` saying how fields are scaled, and ``notes`` holding the exact
:class:`~dinocell.models.loading.Preprocess` as ``dinocell_preprocess=<json>`` (timm's
``PretrainedCfg`` accepts no extra keys).  The patch size is also in ``model_args``.

``dinocell.safetensors`` holds what timm's model does not load but dinocell needs to give back the
backbone it exported: the iBOT mask token (continued pretraining, ``model.pretrained=DIR``, starts from
the trained one) and the RoPE periods (a non-persistent buffer: timm recomputes it, which differs from
an official checkpoint's bf16-rounded periods).  timm ignores the file; folders without it (older
``--format timm`` exports) load with a zero mask token and timm's periods.

Why one format: a ``.safetensors`` + JSON sidecar only dinocell could read was a second way to do the
same thing; old ones are still read (:func:`dinocell.models.backbone.load_export_backbone`), never written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from dinocell.errors import UserError, first_line
from dinocell.paths import write_files_atomic
from dinocell.provenance import provenance

CONFIG = "config.json"  # written last: its presence marks a complete folder
WEIGHTS = "model.safetensors"
EXTRA = "dinocell.safetensors"  # mask token + RoPE periods (timm does not load them)
MASK_TOKEN = "mask_token"
ROPE_PERIODS = "rope_periods"
NOTE_PREFIX = "dinocell_preprocess="
PROVENANCE_PREFIX = "dinocell_provenance="  # the code that made the export (version, git commit)


def describe_scaling(pre: Any) -> str:
    """One readable sentence on how raw fields become model input (for ``pretrained_cfg.description``)."""
    s = pre.scaling
    how = "each channel as its own 1-channel image" if pre.in_chans == 1 else f"{pre.in_chans} channels together"
    clahe = f", then CLAHE (clip {s.clahe_clip}, {s.clahe_tiles} tiles)" if s.clahe else ""
    mode = getattr(s, "mode", "field")
    levels = (f"the fixed raw levels {dict(s.fixed)}" if mode == "fixed" else
              f"its plate's [{s.low_percentile}, {s.high_percentile}] percentiles" if mode == "plate" else
              f"its [{s.low_percentile}, {s.high_percentile}] percentiles")
    stain = "Reinhard stain normalisation, then " if getattr(pre.stain, "use_stain_norm", False) else ""
    illum = {"required": "illumination-corrected ", "auto": "illumination-corrected (where the plate has "
             "functions) "}.get(str(getattr(pre, "illum", "auto")), "")
    return (f"dinocell backbone: {how}; {stain}every channel of a whole {illum}field clipped to "
            f"{levels} and mapped to [0, 1]{clahe}; no mean/std "
            f"normalisation; trained on {pre.crop_size}-px crops, patch {pre.patch_size}; "
            "embedding = normalised CLS token (model.forward_head(model.forward_features(x), pre_logits=True)).")


def is_export_folder(path: str | os.PathLike[str]) -> bool:
    """``path`` is a (complete) timm export folder."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def _extra_tensors(backbone: Any) -> dict[str, torch.Tensor]:
    extra = {MASK_TOKEN: backbone.mask_token.detach().to("cpu").contiguous().clone()}
    rope = getattr(backbone.model, "rope", None)
    if rope is not None and getattr(rope, "periods", None) is not None:
        extra[ROPE_PERIODS] = rope.periods.detach().to("cpu").float().contiguous().clone()
    return extra


def save_timm(backbone: Any, out_dir: str | os.PathLike[str], preprocess: Any) -> Path:
    """Write a ``DinoBackbone`` as ``out_dir/{dinocell.safetensors, model.safetensors, config.json}``, each
    replaced atomically (:func:`dinocell.paths.write_files_atomic`; ``config.json`` last marks completion).

    ``backbone: Any`` (a ``DinoBackbone``): ``models.backbone`` imports this module to load
    ``model.pretrained=DIR``, so importing it back here would be an import cycle."""
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    out = Path(out_dir)
    pre = preprocess.to_dict()
    c, crop = int(backbone.in_chans), int(preprocess.crop_size)
    pretrained_cfg = {
        "tag": "dinocell",
        "input_size": (c, crop, crop),
        "mean": (0.0,) * c,
        "std": (1.0,) * c,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "description": describe_scaling(preprocess),
        "notes": (NOTE_PREFIX + json.dumps(pre, sort_keys=True),
                  PROVENANCE_PREFIX + json.dumps(provenance(), sort_keys=True)),
    }
    data_config = {"input_size": (c, crop, crop), "mean": (0.0,) * c, "std": (1.0,) * c,
                   "interpolation": "bilinear", "crop_pct": 1.0}
    extra = _extra_tensors(backbone)

    def write(tmp: Path) -> None:
        save_for_hf(backbone.model, str(tmp), model_config={"pretrained_cfg": pretrained_cfg},
                    safe_serialization=True, data_config=data_config)
        save_file(extra, str(tmp / EXTRA), metadata={"format": "dinocell-extra"})

    write_files_atomic(out, write, (EXTRA, WEIGHTS, CONFIG))  # weights first: config.json marks completion
    return out


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's ``config.json`` (one-line UserError when it is not a timm model config)."""
    p = Path(folder) / CONFIG
    try:
        conf = json.loads(p.read_text())
        if not isinstance(conf, dict) or not isinstance(conf["architecture"], str):
            raise TypeError("no architecture name")
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{p} is not a timm model config ({type(e).__name__}: {e})") from None
    return conf


def read_extra(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """``dinocell.safetensors`` of an export folder ({} for a folder written without it)."""
    from safetensors.torch import load_file

    p = Path(folder) / EXTRA
    if not p.is_file():
        return {}
    try:
        return load_file(str(p), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"cannot read {p} as safetensors: {first_line(e)}") from None


def load_into(backbone: Any, timm_state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor], source: str) -> None:
    """Load a folder's timm weights and its ``dinocell.safetensors`` extras into a ``DinoBackbone`` (strict,
    one-line UserError on a misfit); without a saved mask token the backbone keeps its own (zero init)."""
    full = {f"model.{k}": v for k, v in timm_state.items()}
    full["mask_token"] = extra.get(MASK_TOKEN, backbone.mask_token.detach().clone())
    backbone.load_checked(full, source, extra.get(ROPE_PERIODS))


def load_folder_weights(backbone: Any, folder: str | os.PathLike[str]) -> None:
    """Load an export folder's weights into an existing ``DinoBackbone`` (``model.pretrained=DIR``: continued
    pretraining); the architectures must match (one-line UserError naming the misfits otherwise)."""
    from safetensors.torch import load_file

    p = Path(folder)
    read_config(p)
    try:
        state = load_file(str(p / WEIGHTS), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"cannot read {p / WEIGHTS} as safetensors: {first_line(e)}") from None
    load_into(backbone, state, read_extra(p), str(p))


def read_preprocess_note(pretrained_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The ``Preprocess`` dict stored by :func:`save_timm` in ``pretrained_cfg['notes']`` (None if absent)."""
    for note in pretrained_cfg.get("notes") or ():
        if isinstance(note, str) and note.startswith(NOTE_PREFIX):
            return json.loads(note[len(NOTE_PREFIX):])
    return None


__all__ = [
    "CONFIG",
    "EXTRA",
    "WEIGHTS",
    "describe_scaling",
    "is_export_folder",
    "load_folder_weights",
    "read_config",
    "read_extra",
    "read_preprocess_note",
    "load_into",
    "save_timm",
]
