"""Gradient clipping per module (backbone, DINO head, iBOT head), as DINOv3's training loop does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from dinocell.config import load_config
from dinocell.train.meta_arch import MultiViewDINO
from dinocell.train.sharding import clip_grad_norm_per_module
from tests_tiny import TINY

REPO = Path(__file__).resolve().parents[2]


def _norm(module: nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()
                                                         if p.grad is not None])))


def _meta_with_grads(extra: list[str] | None = None) -> MultiViewDINO:
    torch.manual_seed(0)
    meta = MultiViewDINO(load_config(None, TINY + (extra or [])))
    for p in meta.student.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    return meta


def test_each_module_is_clipped_on_its_own() -> None:
    meta = _meta_with_grads()
    with torch.no_grad():  # a head with a huge gradient must not shrink the backbone's step
        for p in meta.student["dino_head"].parameters():
            if p.grad is not None:
                p.grad.mul_(1e3)
    backbone_before = [p.grad.clone() for p in meta.student["backbone"].parameters()]
    expected = {k: _norm(m) for k, m in meta.student.items()}
    max_norm = _norm(meta.student["backbone"]) * 2  # backbone below the limit, heads above it
    norms = clip_grad_norm_per_module(meta.student, max_norm)
    assert set(norms) == {"backbone", "dino_head", "ibot_head"}
    for k, v in norms.items():
        assert float(v) == pytest.approx(expected[k], rel=1e-5)
    for p, g in zip(meta.student["backbone"].parameters(), backbone_before, strict=True):
        assert torch.equal(p.grad, g)
    assert _norm(meta.student["dino_head"]) == pytest.approx(max_norm, rel=1e-4)
    assert _norm(meta.student["ibot_head"]) <= max_norm * (1 + 1e-4)


def test_matches_the_official_per_module_loop() -> None:
    """dinov3 train.py: ``for k, v in student.items(): clip_grad_norm_(v.parameters(), max_norm=clip_grad)``."""
    meta, ref = _meta_with_grads(), _meta_with_grads()
    clip_grad_norm_per_module(meta.student, 0.5)
    for m in ref.student.values():
        torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.5)
    for (n, p), q in zip(meta.student.named_parameters(), ref.student.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_a_shared_head_is_clipped_once() -> None:
    meta = _meta_with_grads(["head.ibot_separate_head=false"])
    assert meta.student["ibot_head"] is meta.student["dino_head"]
    norms = clip_grad_norm_per_module(meta.student, 1.0)
    assert set(norms) == {"backbone", "dino_head"}


_FSDP_SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    sys.path.insert(0, {tests!r})
    from tests_tiny import TINY
    from dinocell.config import load_config
    from dinocell.train.meta_arch import MultiViewDINO
    from dinocell.train.sharding import clip_grad_norm_per_module, shard_meta

    dist.init_process_group("gloo")
    def build():
        torch.manual_seed(0)
        return MultiViewDINO(load_config(None, TINY))
    def grads(meta):
        g = torch.Generator().manual_seed(1)  # same full gradients on every rank and in the reference
        return [torch.randn(p.shape, generator=g) for p in meta.student.parameters()]
    ref = build()
    for p, g in zip(ref.student.parameters(), grads(ref)):
        if p.requires_grad:
            p.grad = g.clone()
    ref_norms = clip_grad_norm_per_module(ref.student, 0.05)
    meta = build()
    shard_meta(meta, init_device_mesh("cpu", (dist.get_world_size(),)))
    for p, g in zip(meta.student.parameters(), grads(ref)):
        if p.requires_grad:
            p.grad = torch.distributed.tensor.distribute_tensor(g, p.device_mesh, p.placements)
    norms = clip_grad_norm_per_module(meta.student, 0.05)
    for k in ref_norms:
        torch.testing.assert_close(norms[k], ref_norms[k])
    for (n, p), q in zip(meta.student.named_parameters(), ref.student.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=n)
    if dist.get_rank() == 0:
        print("CLIP_OK", {{k: round(float(v), 4) for k, v in norms.items()}})
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_fsdp2_sharded_gradients_clip_like_unsharded(tmp_path: Path) -> None:
    """Two gloo processes, FSDP2-sharded student: per-module norms are reduced across the shards, so
    norms and clipped gradients equal those of the unsharded model."""
    script = tmp_path / "clip_fsdp.py"
    script.write_text(_FSDP_SCRIPT.format(tests=str(REPO / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CLIP_OK" in proc.stdout
