"""S1/S2 (synthetic) and R1-R3 (real fixtures): the segmentation figures of bench_downstream.py.

A thin entry point kept for the commands in benchmarks/RESULTS.md: every downstream figure is
computed in ``benchmarks/bench_downstream.py`` (one place, one pretraining budget, cached backbones);
this runs its ``synthetic`` and ``real`` groups with the same arguments (``--smoke``, ``--quick``,
``--designs``, ``--budget-steps``, ...).

    PYTHONPATH=src python benchmarks/bench_segmentation.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_downstream import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--only", "synthetic,real", *sys.argv[1:]]))
