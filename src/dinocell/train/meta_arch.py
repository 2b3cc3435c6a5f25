"""Multi-view DINOv3 meta-architecture: student/teacher forward over the crops, EMA, loss assembly.

Channels of one field are views of the same cells.  The G global crops of a sample (``data.views.policy``:
mean + one channel by default, two channels, or every channel) teach each other: the teacher's view of
one teaches the student's view of every other (DINO cross-view pairing, Caron et al. 2021), and all of
them teach every local crop.  iBOT (Zhou et al.
2022) adds masked-patch prediction on the global crops, KoLeo (Sablayrolles et al. 2019, as in DINOv2)
spreads the student's CLS tokens, and optional Gram anchoring (Siméoni et al. 2025) keeps patch
similarities close to those of a frozen Gram teacher (a snapshot of the EMA teacher backbone, refreshed
every ``loss.gram_teacher_every`` steps; ``loss.gram_target=ema`` uses the live EMA teacher instead).
The math lives in :mod:`dinocell.losses`; this module only routes tensors.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from dinocell.config import Config
from dinocell.losses.dense_cross import DenseCrossChannelLoss
from dinocell.losses.dino import DINOLoss, multiview_pairs
from dinocell.losses.gram import GramLoss, resize_patch_tokens
from dinocell.losses.ibot import iBOTPatchLoss
from dinocell.losses.ibot_cross import CrossChannelIBOTLoss, cross_channel_pairing
from dinocell.losses.koleo import KoLeoLoss
from dinocell.models.backbone import build_backbone
from dinocell.models.heads import DINOHead


def _heads(cfg: Config, embed_dim: int) -> nn.ModuleDict:
    h = cfg.head
    dino = DINOHead(embed_dim, h.prototypes, h.hidden_dim, h.bottleneck_dim, h.n_layers,
                    norm_last_layer=h.norm_last_layer)
    if h.ibot_separate_head:
        ibot = DINOHead(embed_dim, h.ibot_prototypes or h.prototypes, h.hidden_dim, h.bottleneck_dim, h.n_layers,
                        norm_last_layer=h.norm_last_layer)
    else:
        ibot = dino
    return nn.ModuleDict({"dino_head": dino, "ibot_head": ibot})


def n_global_crops(batch: dict[str, Any]) -> int:
    """Global crops per sample: the collate function records it (2, the seed policy, when absent)."""
    return int(batch.get("n_global_crops", 2))


class MultiViewDINO(nn.Module):
    """Student (backbone + DINO head + iBOT head) and its EMA teacher, and the loss assembly."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = build_backbone(cfg.model, img_size=cfg.data.views.global_crop_size)
        backbone.set_rope_rescale(cfg.model.rope_rescale_coords)  # train mode only: the teacher stays exact
        heads = _heads(cfg, backbone.embed_dim)
        self.student = nn.ModuleDict({"backbone": backbone, **heads})
        # The teacher starts as an exact copy (released weights initialise both) and is only ever
        # updated by EMA: no gradients, always in eval mode.
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        lc = cfg.loss
        # The frozen Gram teacher exists only when it is used; it is part of the state dict (resume
        # restores the snapshot) and never trained (not in the student, no gradients).
        self.gram_active = True
        self.gram_weight = lc.gram_weight  # the module sets it per step (loss.gram_weight_* schedule)
        self.gram_teacher: nn.Module | None = None
        if lc.gram_weight > 0 and lc.gram_target == "gram_teacher":
            self.gram_teacher = copy.deepcopy(self.teacher["backbone"])
            self.gram_teacher.eval()
        self.dino_loss = DINOLoss(lc.student_temp, lc.sinkhorn_iterations, lc.cross_entropy)
        self.ibot_loss = iBOTPatchLoss(lc.student_temp, lc.sinkhorn_iterations, lc.cross_entropy)
        self.ibot_cross = CrossChannelIBOTLoss(self.ibot_loss) if lc.ibot_cross_channel else None
        self.dense_cross = (DenseCrossChannelLoss(lc.student_temp, lc.sinkhorn_iterations, lc.cross_entropy)
                            if lc.dense_cross_weight > 0 else None)
        self.koleo_loss = KoLeoLoss()
        self.gram_loss = GramLoss(lc.gram_max_tokens)
        self._student_params: list[torch.Tensor] | None = None
        self._teacher_params: list[torch.Tensor] | None = None

    def train(self, mode: bool = True) -> MultiViewDINO:
        """Switch the student; the teacher stays in eval mode whatever the caller asks."""
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """Gram teacher <- the current EMA teacher backbone (parameters and buffers copied)."""
        if self.gram_teacher is None:
            return
        src = self.teacher["backbone"]
        for d, t in zip(self.gram_teacher.parameters(), src.parameters(), strict=True):
            d.copy_(t)
        for d, t in zip(self.gram_teacher.buffers(), src.buffers(), strict=True):
            d.copy_(t)

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` every transformer block of student and teacher, in place.

        ``nn.Module.compile`` keeps the module tree, so parameter and state-dict names do not change:
        layer-wise lr decay still sees ``blocks.<i>`` and a checkpoint resumes across ``train.compile``
        (wrapping the backbone in ``torch.compile`` would prefix every name with ``_orig_mod.``).
        Blocks are the unit dinov3 compiles too; the glue around them stays eager.
        """
        backbones = [self.student["backbone"], self.teacher["backbone"]]
        if self.gram_teacher is not None:
            backbones.append(self.gram_teacher)
        for backbone in backbones:
            for blk in backbone.model.blocks:
                blk.compile(**compile_kwargs)

    # ------------------------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, fused over all tensors (``torch._foreach_lerp_``)."""
        if self._student_params is None:
            pairs = [
                (s, t)
                for (_, s), (_, t) in zip(self.student.named_parameters(), self.teacher.named_parameters(),
                                          strict=True)
            ]
            self._student_params = [s for s, _ in pairs]
            self._teacher_params = [t for _, t in pairs]
        assert self._teacher_params is not None
        s_params = [s.detach().to(t.dtype) for s, t in zip(self._student_params, self._teacher_params, strict=True)]
        # t + (1 - m) (s - t): one read-modify-write pass over the teacher instead of two
        torch._foreach_lerp_(self._teacher_params, s_params, 1.0 - momentum)

    # ------------------------------------------------------------------------------------ forward
    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Any], teacher_temp: float) -> dict[str, torch.Tensor]:
        """Sinkhorn-centred teacher targets for the global crops (CLS) and the masked patches."""
        g = batch["global_crops"]
        n_global = n_global_crops(batch)
        b = g.shape[0] // n_global
        out = self.teacher["backbone"].forward_features(g)
        cls = out["x_norm_clstoken"]
        patches = out["x_norm_patchtokens"]
        logits = self.teacher["dino_head"](cls).view(n_global, b, -1)
        probs = self.dino_loss.teacher_probs(logits, teacher_temp)
        res = {"dino_probs": probs, "dino_logits": logits, "patch_tokens": patches}
        idx = batch["mask_indices"]
        if idx.numel() > 0:
            flat = patches.reshape(-1, patches.shape[-1])
            masked = flat.index_select(0, idx)
            plogits = self.teacher["ibot_head"](masked)
            res["ibot_probs"] = self.ibot_loss.teacher_probs(plogits, teacher_temp)
        if self.dense_cross is not None and self.cfg.loss.dense_cross_mode == "ibot":
            dense = self.teacher["ibot_head"](patches.reshape(-1, patches.shape[-1]))
            res["dense_probs"] = self.dense_cross.teacher_probs(
                dense.view(n_global, b, patches.shape[1], -1), teacher_temp)
        return res

    def dense_cross_loss(self, student_patches: torch.Tensor, targets: dict[str, torch.Tensor],
                         n_global: int) -> torch.Tensor:
        """``loss.dense_cross_*``: every student patch token of aligned crop k against the teacher's
        patch of the other crops at the same position (:class:`DenseCrossChannelLoss`)."""
        assert self.dense_cross is not None
        n, d = student_patches.shape[1], student_patches.shape[2]
        b = student_patches.shape[0] // n_global
        pairing = cross_channel_pairing(n_global).to(student_patches)
        if self.cfg.loss.dense_cross_mode == "cosine":
            teacher = targets["patch_tokens"].view(n_global, b, n, d)
            return self.dense_cross.cosine(student_patches.view(n_global, b, n, d), teacher, pairing)
        logits = self.student["ibot_head"](student_patches.reshape(-1, d)).view(n_global, b, n, -1)
        return self.dense_cross.ibot(logits, targets["dense_probs"], pairing)

    def forward(self, batch: dict[str, Any], teacher_temp: float,
                gram_generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """All losses for one batch (weighted total in ``total``) and detached diagnostics.

        G global crops per sample come from the batch (``n_global_crops``; 2 when absent).  DINO runs over
        every ordered pair of distinct globals, KoLeo is summed over the G globals (DINOv3 for G = 2).
        With ``loss.ibot_cross_channel`` the masked tokens of aligned crop k learn the teacher's tokens of
        the other crops at the same positions (:class:`CrossChannelIBOTLoss`) instead of their own.
        With ``loss.dense_cross_weight > 0`` *every* patch token of aligned crop k also learns the
        teacher's token of the other crops at the same position (:meth:`dense_cross_loss`; key
        ``dense_cross``, zero when off).

        Diagnostics (detached, keys start with ``_``): ``_teacher_probs`` (Sinkhorn targets, (G, B, K)),
        ``_teacher_logits`` (the teacher's DINO-head logits *before* Sinkhorn, (G, B, K); its softmax at
        ``teacher_temp`` shows prototype collapse, which the balanced targets hide), ``_student_cls``
        and ``_patch_tokens``.  The Gram term is zero while ``self.gram_active`` is False (the module
        sets it per step: before ``loss.gram_teacher_start`` there is no snapshot to anchor to).
        """
        lc = self.cfg.loss
        g, loc = batch["global_crops"], batch["local_crops"]
        n_global = n_global_crops(batch)
        b = g.shape[0] // n_global
        n_local = loc.shape[0] // b if loc.numel() else 0
        targets = self.teacher_targets(batch, teacher_temp)

        sb = self.student["backbone"]
        s_glob = sb.forward_features(g, masks=batch["masks"])
        cls_g = s_glob["x_norm_clstoken"]
        cls_all = cls_g
        if n_local:
            cls_l = sb.forward_features(loc)["x_norm_clstoken"]
            cls_all = torch.cat([cls_g, cls_l])
        s_logits = self.student["dino_head"](cls_all).view(n_global + n_local, b, -1)
        pairs = multiview_pairs(n_global, n_local)
        losses: dict[str, torch.Tensor] = {}
        losses["dino"] = self.dino_loss(s_logits, targets["dino_probs"], pairs)

        idx = batch["mask_indices"]
        if "ibot_probs" in targets and lc.ibot_weight > 0:
            patches = s_glob["x_norm_patchtokens"]
            masked = patches.reshape(-1, patches.shape[-1]).index_select(0, idx)
            s_plogits = self.student["ibot_head"](masked)
            weight = batch["masks_weight"].to(s_plogits)
            if self.ibot_cross is not None:
                pairing = cross_channel_pairing(n_global).to(s_plogits)
                losses["ibot"] = self.ibot_cross(s_plogits, targets["ibot_probs"], weight, g.shape[0], pairing)
            else:
                losses["ibot"] = self.ibot_loss(s_plogits, targets["ibot_probs"], weight, n_images=g.shape[0])
        else:
            losses["ibot"] = cls_g.sum() * 0.0

        if lc.koleo_weight > 0:
            # summed over the global crops (dinov3: koleo_scale = n_global_crops)
            losses["koleo"] = self.koleo_loss(cls_g.view(n_global, b, -1))
        else:
            losses["koleo"] = cls_g.sum() * 0.0

        if lc.gram_weight > 0 and self.gram_active:
            if self.gram_teacher is not None:
                with torch.no_grad():  # its own (e.g. larger, undistorted) crops when the batch has them
                    gram_in = batch.get("gram_teacher_crops", g)
                    gram_target = resize_patch_tokens(self.gram_teacher.forward_features(gram_in)["x_norm_patchtokens"],
                                                      s_glob["x_norm_patchtokens"].shape[1])
            else:
                gram_target = targets["patch_tokens"]
            losses["gram"] = self.gram_loss(s_glob["x_norm_patchtokens"], gram_target, generator=gram_generator)
        else:
            losses["gram"] = cls_g.sum() * 0.0

        losses["total"] = (lc.dino_weight * losses["dino"] + lc.ibot_weight * losses["ibot"]
                           + lc.koleo_weight * losses["koleo"] + self.gram_weight * losses["gram"])
        if self.dense_cross is not None:
            losses["dense_cross"] = self.dense_cross_loss(s_glob["x_norm_patchtokens"], targets, n_global)
            losses["total"] = losses["total"] + lc.dense_cross_weight * losses["dense_cross"]
        else:
            losses["dense_cross"] = cls_g.sum() * 0.0
        losses["_teacher_probs"] = targets["dino_probs"].detach()
        losses["_teacher_logits"] = targets["dino_logits"].detach()
        losses["_student_cls"] = cls_g.detach()
        losses["_patch_tokens"] = s_glob["x_norm_patchtokens"].detach()
        return losses
