"""PROF: copairs replicate mAP of pretrained vs untrained features, from bench_downstream.py.

A thin entry point: the figure is computed in ``benchmarks/bench_downstream.py`` (its ``prof``
group) with the backbone pretrained at the benchmark's fixed budget and cached by config hash, so it
is the same backbone the segmentation figures use.

    PYTHONPATH=src python benchmarks/bench_profiling.py --quick
    -> PROF ratio=<trained negcon mAP / untrained negcon mAP> target>=1.05
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_downstream import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--only", "prof", "--designs", "multiview", *sys.argv[1:]]))
