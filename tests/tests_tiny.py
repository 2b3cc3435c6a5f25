"""Overrides that make a model/run small enough for unit tests on 2 CPU cores.

A plain module (not conftest) so any test file can import it: several conftest.py files exist and
``from conftest import ...`` would pick whichever was imported first.
"""

TINY_OVERRIDES = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
    "head.prototypes=64", "head.hidden_dim=64", "head.bottleneck_dim=32",
    "data.views.global_crop_size=32", "data.views.local_crop_size=16", "data.views.n_local_crops=2",
    "data.synthetic.n_fields=16", "data.synthetic.size=64", "data.batch_size=4",
    "track.logger=none", "train.progress_bar=false", "train.eval_fields=8",
]

TINY = list(TINY_OVERRIDES)
