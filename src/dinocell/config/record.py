"""A run folder's ``config.yaml``: the resolved *input* config, with the run record as comments.

Run outputs (held-out well counts, figures) belong in ``summary.json``, never here: this file must
reload as the same strict config, so ``dinocell pretrain --config RUN/config.yaml`` reproduces the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from dinocell.config.engine import to_dict
from dinocell.paths import write_text_atomic
from dinocell.runs import RunDir


def save_config(cfg: Any, run_dir: str | os.PathLike[str], record: dict[str, Any] | None = None) -> Path:
    """Write the resolved config atomically to ``run_dir/config.yaml``.

    ``record`` (the code that made the run, the channel map and its origin) is written as YAML comments
    at the top: a person and ``yaml.safe_load`` both see it, yet the file stays a strict config that
    ``config_from_dict`` reloads without an unknown key."""
    head = "".join(f"# {k}: {json.dumps(v, sort_keys=True)}\n" for k, v in (record or {}).items())
    return write_text_atomic(RunDir(run_dir).config, head + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``record`` comments :func:`save_config` wrote at the top of a run's config.yaml."""
    out: dict[str, Any] = {}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("# ") or ": " not in line:
            break
        key, value = line[2:].split(": ", 1)
        try:
            out[key] = json.loads(value)
        except ValueError:
            break
    return out
