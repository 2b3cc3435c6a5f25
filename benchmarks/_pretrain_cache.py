"""Pretrained backbones for the downstream benchmarks, one per *design*, cached by config hash.

A design is a name plus a list of ``key=value`` overrides of ``configs/demo_synthetic.yaml`` (the
multiview demo).  Every downstream figure compares designs at ONE fixed pretraining budget
(``max_steps``), so the run folder is keyed by a hash of what determines the weights: the base YAML's
text, the design's overrides, the benchmark's own overrides (sizes) and the step budget.  A finished
run is ``runs/bench_cache/<hash>/`` with ``bench_cache.json`` written last (atomically); reruns and
other benchmarks asking for the same design and budget reuse it instead of pretraining again.

New designs are added by name to :data:`DESIGNS` (or on a benchmark's command line with
``--design NAME:key=value``), e.g. ``dense: [loss.dense_cross_weight=1.0]``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "demo_synthetic.yaml"
DEFAULT_CACHE = ROOT / "runs" / "bench_cache"
MARKER = "bench_cache.json"

# The demo config is the multiview design; single_view is the seed's one-image views (cross-channel
# iBOT needs two channel views, so it is switched off with them).
DESIGNS: dict[str, list[str]] = {
    "multiview": [],
    "single_view": ["data.views.policy=single_view", "loss.ibot_cross_channel=false", "loss.dense_cross_weight=0"],
    # the issue-20 screen: the shipped multiview design minus / with one lever each
    "no_dense": ["loss.dense_cross_weight=0"],
    "dense_ibot": ["loss.dense_cross_mode=ibot"],
    "no_rope_rescale": ["model.rope_rescale_coords=null"],
}

# Pretraining plumbing that does not change the weights' meaning: no logger, no progress bar, no
# held-out evaluation at the end, in-process data loading (benchmarks run on 2 shared cores).
QUIET = ["track.logger=none", "train.progress_bar=false", "train.eval_fields=0", "data.num_workers=0"]


def parse_design_args(names: list[str], extra: list[str]) -> dict[str, list[str]]:
    """Designs selected by name (``names``), plus ``NAME:key=value`` items adding overrides to a
    (possibly new) design.  Unknown names without overrides are an error (a typo otherwise trains a
    copy of the demo)."""
    added: dict[str, list[str]] = {}
    for item in extra:
        name, sep, override = item.partition(":")
        if not sep or "=" not in override or not name:
            raise SystemExit(f"--design expects NAME:key=value, got '{item}'")
        added.setdefault(name, []).append(override)
    out: dict[str, list[str]] = {}
    for name in names:
        if name not in DESIGNS and name not in added:
            raise SystemExit(f"unknown design '{name}' (known: {', '.join(DESIGNS)}); "
                             f"define it with --design {name}:key=value")
        out[name] = DESIGNS.get(name, []) + added.get(name, [])
    for name, overrides in added.items():
        if name not in out:
            out[name] = DESIGNS.get(name, []) + overrides
    return out


def cache_key(overrides: list[str], steps: int | None, base: Path = BASE_CONFIG) -> str:
    """Hash of everything that determines the pretrained weights (16 hex digits)."""
    blob = json.dumps({"base": base.read_text(), "overrides": list(overrides), "steps": steps}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained_run(design: str, overrides: list[str], steps: int | None, sizes: list[str] | None = None,
                   cache: Path = DEFAULT_CACHE, base: Path = BASE_CONFIG) -> Path:
    """The run folder of ``design`` pretrained for ``steps`` (None: the base config's full schedule),
    from the cache or trained now through the library's ``pretrain`` (what ``dinocell pretrain`` runs)."""
    from dinocell.config import load_config
    from dinocell.paths import write_text_atomic
    from dinocell.train.run import pretrain

    every = list(sizes or []) + list(overrides)
    run = Path(cache) / cache_key(every, steps, base)
    if (run / MARKER).is_file():
        return run
    cfg = load_config(base, QUIET + every + [f"train.checkpoint_every_steps={max(steps or 100, 1)}"])
    t0 = time.perf_counter()
    pretrain(cfg, run, max_steps=steps)
    seconds = time.perf_counter() - t0
    print(f"pretrained {design}: {steps or 'full'} steps in {seconds:.0f} s -> {run}", flush=True)
    write_text_atomic(run / MARKER, json.dumps({"design": design, "overrides": every, "steps": steps,
                                                "base": str(base), "seconds": round(seconds, 1)}, indent=2))
    return run
