"""Export a backbone as a timm model folder: ``config.json`` + ``model.safetensors``.

``timm.create_model("local-dir:DIR", pretrained=True)`` rebuilds the backbone from such a folder with
no dinocell installed, and the same folder can be pushed to the Hugging Face Hub as is
(``hf-hub:user/name``).  The files are written by timm's own ``save_for_hf`` so the layout follows
timm's format as it evolves.

What the model expects as input travels in ``pretrained_cfg``: ``input_size`` = (in_chans, crop,
crop) with the training crop, ``mean`` 0 / ``std`` 1 (inputs are already in [0, 1]: no ImageNet
normalisation), a ``description`` saying how fields are scaled, and ``notes`` holding the exact
:class:`~dinocell.models.loading.Preprocess` as ``dinocell_preprocess=<json>`` (timm's
``PretrainedCfg`` accepts no extra keys).  The patch size is also in ``model_args``.

Not exported: the iBOT mask token (training only) and RoPE periods copied from an official
checkpoint (a non-persistent buffer; timm recomputes it, exactly as timm's own DINOv3 conversion does
-- the difference is the bf16 rounding of the released periods).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dinocell.models.backbone import DinoBackbone
from dinocell.paths import write_files_atomic
from dinocell.provenance import provenance

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


def save_timm(backbone: DinoBackbone, out_dir: str | os.PathLike[str], preprocess: Any) -> Path:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` (each replaced atomically)."""
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
    write_files_atomic(out, lambda tmp: save_for_hf(backbone.model, str(tmp), model_config={"pretrained_cfg": pretrained_cfg},
                                                    safe_serialization=True, data_config=data_config),
                       ("model.safetensors", "config.json"))  # weights first: config.json marks completion
    return out


def read_preprocess_note(pretrained_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The ``Preprocess`` dict stored by :func:`save_timm` in ``pretrained_cfg['notes']`` (None if absent)."""
    for note in pretrained_cfg.get("notes") or ():
        if isinstance(note, str) and note.startswith(NOTE_PREFIX):
            return json.loads(note[len(NOTE_PREFIX):])
    return None


__all__ = ["describe_scaling", "read_preprocess_note", "save_timm"]
