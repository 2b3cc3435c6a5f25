"""LightningModule for the segmenter: losses, optimiser groups, lr schedule, checkpoint metadata.

Losses: mean squared error of the sigmoid distance map against the normalised distance transform
(DINOCell / SAMCell regress this map), binary cross-entropy of the foreground, and for the optional
flow head the squared error of the tanh flows inside objects (Cellpose).  Fine-tuning uses the engine's
backbone parameter groups (:mod:`dinocell.engine.param_groups`: layer-wise lr decay by
``DinoBackbone.layer_id``, as pretraining) with the backbone's lr scaled by ``optim.backbone_lr_mult``;
a frozen backbone has no groups at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from dinocell.config import to_dict
from dinocell.engine import param_groups as groups_
from dinocell.engine.checkpoint import check_compatible
from dinocell.engine.schedules import cosine
from dinocell.engine.trainer import NonFiniteLossError
from dinocell.runs import LAST
from dinocell.segment.model import SegmentationNet

CKPT_KEY = "dinocell_segment"


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weights: Any) -> dict[str, torch.Tensor]:
    """Distance MSE + foreground BCE (+ flow MSE inside objects); ``weights`` is ``cfg.optim``."""
    dist = F.mse_loss(torch.sigmoid(logits[:, 0]), target[:, 0])
    fg = F.binary_cross_entropy_with_logits(logits[:, 1], target[:, 1])
    out = {"distance": dist, "foreground": fg}
    total = weights.distance_weight * dist + weights.foreground_weight * fg
    if logits.shape[1] > 2 and target.shape[1] > 2:
        inside = target[:, 1:2]
        err = (torch.tanh(logits[:, 2:4]) - target[:, 2:4]) ** 2 * inside
        out["flow"] = err.sum() / inside.sum().clamp_min(1.0) / 2
        total = total + weights.flow_weight * out["flow"]
    out["loss"] = total
    return out


def _decay_groups(named: list[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    decay = [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in named if not (p.ndim > 1 and not n.endswith(".bias"))]
    return [{"params": ps, "lr_multiplier": 1.0, "wd_multiplier": wm, "lr": 0.0, "weight_decay": 0.0}
            for ps, wm in ((decay, 1.0), (no_decay, 0.0)) if ps]


def param_groups(net: SegmentationNet, cfg: Any) -> list[dict[str, Any]]:
    """Decoder groups (lr x1) plus, when fine-tuning, the engine's backbone groups x backbone_lr_mult."""
    decoder = [(n, p) for n, p in net.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = _decay_groups(decoder)
    if not net.frozen:
        backbone = [(n, p) for n, p in net.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        for g in groups_.param_groups(backbone, net.backbone, cfg.optim.layerwise_decay,
                                      cfg.optim.patch_embed_lr_mult):
            g["lr_multiplier"] *= cfg.optim.backbone_lr_mult
            groups.append(g)
    return groups


class StepSampler(Sampler[int]):
    """Dataset indices ``start .. total - 1`` in order (crop ``i`` is a pure function of ``i``).

    ``__len__`` is the whole run even when resuming: Lightning counts batches from the restored step,
    so the loader reports the run's length while yielding only what is left (as pretrain's
    :class:`dinocell.data.stream.StreamSampler`)."""

    def __init__(self, start: int, total: int) -> None:
        self.start, self.total = int(start), int(total)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.total))

    def __len__(self) -> int:
        return self.total


class SegmentModule(L.LightningModule):
    """Trains :class:`SegmentationNet` on random crops of annotated fields."""

    def __init__(self, cfg: Any, net: SegmentationNet, dataset: Dataset | None = None,
                 channel_names: list[str] | None = None) -> None:
        super().__init__()
        self.cfg, self.net, self.dataset = cfg, net, dataset
        self.channel_names = list(channel_names or [])
        self.loss_history: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train_dataloader(self) -> DataLoader:
        """Built when fitting starts, so a resumed run's restored ``global_step`` is known: the sampler
        continues the sample stream exactly where the uninterrupted run would be."""
        assert self.dataset is not None
        bs = self.cfg.train.batch_size
        start = self.trainer.global_step * bs if self._trainer is not None else 0
        return DataLoader(self.dataset, batch_size=bs, sampler=StepSampler(start, len(self.dataset)),
                          num_workers=max(0, self.cfg.data.num_workers), drop_last=True,
                          persistent_workers=self.cfg.data.num_workers > 0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(self.net, self.cfg), betas=(0.9, 0.999))

    def _lr(self, step: int) -> float:
        o = self.cfg.optim
        return cosine(min(step, self.cfg.train.steps - 1), self.cfg.train.steps, o.lr, o.min_lr,
                            warmup_steps=o.warmup_steps)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        lr = self._lr(self.global_step)
        for g in self.optimizers(use_pl_optimizer=False).param_groups:
            g["lr"] = lr * g["lr_multiplier"]
            g["weight_decay"] = self.cfg.optim.weight_decay * g["wd_multiplier"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = segmentation_loss(self.net(batch["image"]), batch["target"], self.cfg.optim)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"segmentation loss became {loss.item()} at step {self.global_step}")
        self.loss_history.append(float(loss.detach()))
        if self.global_step % max(1, self.cfg.train.log_interval) == 0:
            self.log_dict({f"seg/{k}": v.detach() for k, v in out.items()}, on_step=True, on_epoch=False,
                          batch_size=batch["image"].shape[0])
            self.log("seg/lr", self._lr(self.global_step), on_step=True, on_epoch=False)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """What :func:`dinocell.segment.run.load_segmenter` needs to rebuild the model, as plain data."""
        bb = self.net.backbone
        rope = bb.model.rope
        checkpoint[CKPT_KEY] = {
            "config": to_dict(self.cfg),
            "backbone_arch": dict(bb.arch),
            "rope_periods": rope.periods.detach().cpu().float().clone() if rope is not None else None,
            "channel_names": self.channel_names,
            "loss_history": list(self.loss_history),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compatible(self.state_dict(), checkpoint.get("state_dict", {}), LAST)  # one line on mismatch
        self.loss_history = list(checkpoint.get(CKPT_KEY, {}).get("loss_history", []))
