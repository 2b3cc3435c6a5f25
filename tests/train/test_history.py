

def test_device_losses_are_recorded_without_a_transfer_per_step() -> None:
    """record() keeps tensors until the history is read (or flush_every is reached): one transfer."""
    import torch

    from dinocell.train.history import LossHistory

    h = LossHistory(head=2, tail=3)
    h.flush_every = 4
    for v in (1.0, 2.0, 3.0):
        h.record(torch.tensor(v))
    assert len(h._pending) == 3 and h.count == 0  # nothing moved to the host yet
    h.record(torch.tensor(4.0))  # the fourth reaches flush_every
    assert not h._pending and h.count == 4
    h.record(torch.tensor(5.0))
    assert h.last == 5.0 and h.first == 1.0 and h.mean == 3.0 and len(h) == 5
    assert h.state()["tail"] == [3.0, 4.0, 5.0]
