"""Row chunks for the memory-bound passes over (rows x prototypes) tensors.

With 65536 prototypes one row is 256 kB of float32: a chunk of rows stays in cache, so a chain of
element-wise operations applied chunk by chunk reads and writes main memory once instead of once per
operation, and its temporaries are chunk-sized instead of full (rows x K) tensors.  Chunks must still be large enough that the per-operation dispatch cost (~10 us) stays small.
"""

from __future__ import annotations

__all__ = ["CHUNK_ELEMENTS", "row_chunks"]

#: Elements per chunk: 64 MiB of float32 (256 rows of 65536).  Smaller chunks fit L2 but multiply the
#: operations, and each pays an OpenMP fork-join that stalls for a scheduler slice when the cores are
#: oversubscribed (measured: ~30x slower at 4 MiB chunks with 10 processes per core).
CHUNK_ELEMENTS = 1 << 24


def row_chunks(n_rows: int, n_cols: int, chunk_elements: int = CHUNK_ELEMENTS) -> list[slice]:
    """Consecutive row slices covering ``range(n_rows)``, each about ``chunk_elements`` elements."""
    step = max(1, chunk_elements // max(1, n_cols))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]
