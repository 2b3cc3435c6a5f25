"""Sinkhorn-Knopp centering vs a direct NumPy transcription of DINOv2's algorithm."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinocell.losses.sinkhorn import sinkhorn_knopp


def numpy_sinkhorn(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """DINOv2's exp-domain Sinkhorn-Knopp, float64, single process."""
    q = np.exp(logits.astype(np.float64) / temp).T  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


@pytest.mark.parametrize("n_iterations", [1, 3, 10])
@pytest.mark.parametrize(("b", "k"), [(4, 3), (7, 5), (16, 32)])
def test_matches_numpy_reference(b: int, k: int, n_iterations: int) -> None:
    rng = np.random.default_rng(b * 100 + k)
    logits = rng.normal(size=(b, k)).astype(np.float32)
    ours = sinkhorn_knopp(torch.from_numpy(logits), 0.5, n_iterations).numpy()
    ref = numpy_sinkhorn(logits, 0.5, n_iterations)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)


def test_rows_sum_to_one() -> None:
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(0)) * 3
    probs = sinkhorn_knopp(logits, 0.1)
    assert probs.shape == (9, 6)
    assert torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(9), rtol=0, atol=1e-5)


def test_marginals_closer_to_uniform_than_softmax() -> None:
    # a batch whose softmax piles onto prototype 0: the centred targets must spread it out
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 4, generator=g)
    logits[:, 0] += 2.0
    soft = torch.softmax(logits / 0.5, dim=1)
    probs = sinkhorn_knopp(logits, 0.5, n_iterations=3)
    uniform = torch.full((4,), 1 / 4)
    soft_dev = (soft.mean(dim=0) - uniform).abs().max()
    sk_dev = (probs.mean(dim=0) - uniform).abs().max()
    assert soft_dev > 0.2
    assert sk_dev < 0.02
    assert sk_dev < soft_dev / 10


def test_many_iterations_give_equipartition() -> None:
    b, k = 12, 5
    logits = torch.randn(b, k, generator=torch.Generator().manual_seed(2))
    probs = sinkhorn_knopp(logits, 0.7, n_iterations=200)
    # column sums of Q = probs / B equal 1/K, row sums 1/B
    torch.testing.assert_close((probs / b).sum(dim=0), torch.full((k,), 1 / k), rtol=0, atol=1e-6)
    torch.testing.assert_close((probs / b).sum(dim=1), torch.full((b,), 1 / b), rtol=0, atol=1e-6)


def test_invariant_to_global_shift_and_stable_for_huge_logits() -> None:
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    base = sinkhorn_knopp(logits, 0.04)
    torch.testing.assert_close(sinkhorn_knopp(logits + 50.0, 0.04), base, rtol=1e-4, atol=1e-5)
    # exp(1000 / 0.04) overflows any float; the shifted exponent must not
    big = sinkhorn_knopp(logits * 1000.0, 0.04)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big.sum(dim=1), torch.ones(6), rtol=0, atol=1e-5)


def test_low_precision_input_no_grad_float32_output() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    probs = sinkhorn_knopp(logits.bfloat16(), 0.1)
    assert probs.dtype == torch.float32
    assert not probs.requires_grad


def test_empty_batch_returns_empty() -> None:
    out = sinkhorn_knopp(torch.zeros(0, 7), 0.1)
    assert out.shape == (0, 7)


@pytest.mark.parametrize(
    ("logits", "temp", "iters", "match"),
    [
        (torch.zeros(2, 3, 4), 0.1, 3, r"\(B, K\)"),
        (torch.zeros(2, 3), 0.0, 3, "teacher_temp"),
        (torch.zeros(2, 3), 0.1, 0, "n_iterations"),
    ],
)
def test_bad_arguments(logits: torch.Tensor, temp: float, iters: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sinkhorn_knopp(logits, temp, iters)


def _distributed_worker(
    rank: int, world: int, init_file: str, logits: torch.Tensor, split: int, out_dir: str
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shards = [logits[:split], logits[split:]]  # unequal shards: the batch size is all-reduced too
        probs = sinkhorn_knopp(shards[rank], 0.3, n_iterations=3)
        torch.save(probs, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("split", [5, 12])  # 12: rank 1 holds no rows but must join the collectives
def test_distributed_equals_single_process_on_whole_batch(tmp_path, split: int) -> None:
    logits = torch.randn(12, 6, generator=torch.Generator().manual_seed(4))
    mp.spawn(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), logits, split, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    got = torch.cat([torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)])
    torch.testing.assert_close(got, sinkhorn_knopp(logits, 0.3, n_iterations=3), rtol=1e-5, atol=1e-6)
    if split < 12:  # and it is not just the per-shard answer
        local = torch.cat([sinkhorn_knopp(logits[:split], 0.3), sinkhorn_knopp(logits[split:], 0.3)])
        assert not torch.allclose(got, local, atol=1e-4)


def log_domain_reference(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """DINOv2's iterations in the float64 log domain: exact whatever the spread of the logits."""
    x = logits.double() / temp
    b, k = x.shape
    x = x - torch.logsumexp(x.flatten(), 0)
    for _ in range(n_iterations):
        x = x - torch.logsumexp(x, dim=0, keepdim=True) - np.log(k)
        x = x - torch.logsumexp(x, dim=1, keepdim=True) - np.log(b)
    return torch.exp(x + np.log(b))


@pytest.mark.parametrize("n_iterations", [1, 3])
def test_wide_spread_matches_log_domain(n_iterations: int) -> None:
    # spreads of ~1000 / temperature: a global exp shift would underflow whole columns and rows
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(9, 7, generator=g)
    logits[:, 3] -= 40.0  # a prototype every sample rejects
    logits[4] -= 30.0  # a sample far from every prototype
    ours = sinkhorn_knopp(logits, 0.04, n_iterations)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), log_domain_reference(logits, 0.04, n_iterations), rtol=1e-4, atol=1e-5)


def test_chunked_passes_match_reference_across_chunks(monkeypatch) -> None:
    import dinocell.losses.sinkhorn as sk

    logits = torch.randn(23, 40, generator=torch.Generator().manual_seed(6))
    whole = sinkhorn_knopp(logits, 0.1)
    from dinocell.losses.chunking import row_chunks

    monkeypatch.setattr(sk, "row_chunks", lambda n, k: row_chunks(n, k, chunk_elements=3 * k))
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1), whole, rtol=1e-6, atol=1e-7)
    ref = numpy_sinkhorn(logits.numpy(), 0.1, 3)
    np.testing.assert_allclose(whole.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_no_host_synchronisation(monkeypatch) -> None:
    # .item() / float() / bool() on a device tensor would stall a GPU step: none may happen inside
    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside Sinkhorn or the losses")

    from dinocell.losses.dino import DINOLoss
    from dinocell.losses.ibot import iBOTPatchLoss

    g = torch.Generator().manual_seed(8)
    t_cls, s_cls = torch.randn(2, 4, 50, generator=g), torch.randn(3, 4, 50, generator=g).requires_grad_()
    t_patch, s_patch = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g).requires_grad_()
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with pytest.raises(AssertionError, match="host"):  # the guard is live
        float(torch.ones(()))
    dino, ibot = DINOLoss(), iBOTPatchLoss()
    loss = dino(s_cls, dino.teacher_probs(t_cls, 0.04))
    loss = loss + ibot(s_patch, ibot.teacher_probs(t_patch, 0.04), torch.full((6,), 0.5), 4)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss).item()
