"""Trainer plumbing shared by ``train`` (pretraining) and ``segment`` (segmenter fitting).

* :mod:`~dinocell.engine.checkpoint`: atomic keep-last-N checkpoint I/O, safe loading, resume checks;
* :mod:`~dinocell.engine.trainer`: devices, precision, the checkpoint callback, the Trainer, quiet fits;
* :mod:`~dinocell.engine.param_groups`: AdamW groups with layer-wise lr decay and dinov3's decay rule;
* :mod:`~dinocell.engine.schedules`: lr curves (warm-up + cosine) as pure functions of the step.

It sits below both (``train`` and ``segment`` are independent siblings) and above ``data`` / ``models``.
"""
