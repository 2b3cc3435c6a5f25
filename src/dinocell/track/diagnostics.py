"""Training diagnostics: gradient, collapse and system statistics, attention maps.

The scalar functions (:func:`grad_stats`, :func:`collapse_stats`, :func:`system_stats`) are pure: the
LightningModule calls them and logs the returned ``{name: float}`` dicts itself, so they know nothing
about loggers or ranks.  The figures are drawn by :mod:`dinocell.evaluate.plots` (a matplotlib-only
leaf that evaluation uses too); :mod:`dinocell.track.callbacks` saves them and hands them to the
attached logger.

Why these numbers: self-distillation fails silently.  A collapsed teacher (every image mapped to one
prototype) keeps the DINO loss low and stable; the symptoms are a teacher entropy near 0 (one
prototype) or near ``log K`` (uniform output), a student embedding variance across the batch that goes
to 0, and CLS/patch token norms that drift (Caron et al. 2021, arXiv:2104.14294, Sec. 5.3;
Oquab et al. 2023, arXiv:2304.07193).  Gradient norms per part catch exploding heads early.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

import torch

# --------------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------------


def _group_of(name: str) -> str:
    """``backbone`` or ``head`` from a parameter name (``meta.student.dino_head.mlp.0.weight`` ...)."""
    parts = name.split(".")
    if "backbone" in parts:
        return "backbone"
    if any("head" in p for p in parts):
        return "head"
    return "backbone"


@torch.no_grad()
def grad_stats(named_params: Iterable[tuple[str, torch.nn.Parameter | torch.Tensor]]) -> dict[str, float]:
    """Per-tensor gradient L2 norms summarised per part: mean, std and max, plus the global norm.

    Keys: ``gradients/{backbone,head}_{mean,std,max}`` (over the parameter tensors of that part that
    have a gradient) and ``gradients/global_norm`` (L2 norm of all gradients together, the quantity
    gradient clipping acts on).  Parts without gradients are omitted.  One device sync in total.
    """
    groups: dict[str, list[torch.Tensor]] = {"backbone": [], "head": []}
    for name, p in named_params:
        g = getattr(p, "grad", None)
        if g is None:
            continue
        full = getattr(g, "full_tensor", None)  # an FSDP2 DTensor shard: the norm is of the whole tensor
        g = full() if full is not None else g
        groups[_group_of(name)].append(torch.linalg.vector_norm(g.detach().float()))
    out: dict[str, float] = {}
    all_norms: list[torch.Tensor] = []
    stacked: dict[str, torch.Tensor] = {}
    for key, norms in groups.items():
        if norms:
            stacked[key] = torch.stack(norms)
            all_norms.extend(norms)
    if not all_norms:
        return out
    summary = []
    for v in stacked.values():
        summary.append(torch.stack([v.mean(), v.std(unbiased=False), v.max()]))
    total = torch.linalg.vector_norm(torch.stack(all_norms))
    values = torch.cat([torch.cat(summary), total.reshape(1)]).cpu().tolist()
    i = 0
    for key in stacked:
        out[f"gradients/{key}_mean"], out[f"gradients/{key}_std"], out[f"gradients/{key}_max"] = values[i:i + 3]
        i += 3
    out["gradients/global_norm"] = values[-1]
    return out


@torch.no_grad()
def teacher_entropy(teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_k p_k log p_k`` (nats) of (..., K) probabilities, as a 0-d tensor."""
    p = teacher_probs.detach().float().reshape(-1, teacher_probs.shape[-1])
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


@torch.no_grad()
def collapse_stats(
    teacher_probs: torch.Tensor | None = None,
    student_cls: torch.Tensor | None = None,
    cls_tokens: torch.Tensor | None = None,
    patch_tokens: torch.Tensor | None = None,
) -> dict[str, float]:
    """Collapse indicators; any argument may be ``None`` (its key is then omitted).

    * ``diag/teacher_entropy``: mean over images of ``-sum_k p_k log p_k`` of the teacher's centred
      (Sinkhorn-Knopp) probabilities (B, K), in nats.  ~0: one-prototype collapse; ~log K: uniform.
    * ``diag/student_var``: variance over the batch of the student's CLS embedding (B, D), averaged over
      dimensions; -> 0 means every image gets the same embedding.
    * ``diag/cls_norm`` / ``diag/patch_norm``: mean L2 norm of CLS tokens (B, D) / patch tokens (..., D).
    """
    out: dict[str, float] = {}
    vals: list[tuple[str, torch.Tensor]] = []
    if teacher_probs is not None:
        vals.append(("diag/teacher_entropy", teacher_entropy(teacher_probs)))
    if student_cls is not None:
        s = student_cls.detach().float().reshape(-1, student_cls.shape[-1])
        var = s.var(dim=0, unbiased=False).mean() if s.shape[0] > 1 else s.new_zeros(())
        vals.append(("diag/student_var", var))
    if cls_tokens is not None:
        c = cls_tokens.detach().float()
        vals.append(("diag/cls_norm", torch.linalg.vector_norm(c, dim=-1).mean()))
    if patch_tokens is not None:
        t = patch_tokens.detach().float()
        vals.append(("diag/patch_norm", torch.linalg.vector_norm(t, dim=-1).mean()))
    if vals:
        numbers = torch.stack([v for _, v in vals]).cpu().tolist()
        out = {k: float(x) for (k, _), x in zip(vals, numbers, strict=True)}
    return out


COLLAPSE_SHARE = 0.5  # more than half of the batch's teacher probability mass on one prototype


@torch.no_grad()
def prototype_usage_stats(teacher_logits: torch.Tensor, teacher_temp: float) -> dict[str, float]:
    """How many prototypes the teacher uses, from its softmax *before* Sinkhorn-Knopp centring.

    Sinkhorn balances the targets over the batch by construction, so their entropy cannot show the
    teacher mapping every image to one prototype; the raw softmax ``p = softmax(logits / T)`` (..., K)
    can.  From its batch mean ``m``:

    * ``diag/teacher_usage_entropy``: ``-sum_k m_k log m_k`` (nats); 0 when one prototype takes all.
    * ``diag/teacher_max_share``: ``max_k m_k``, the share of the busiest prototype.
    * ``diag/teacher_collapsed``: 1.0 when that share exceeds :data:`COLLAPSE_SHARE`, else 0.0.
    """
    logits = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
    mean = torch.softmax(logits / teacher_temp, dim=-1).mean(0)
    entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    share = mean.max()
    values = torch.stack([entropy, share]).cpu().tolist()
    return {"diag/teacher_usage_entropy": values[0], "diag/teacher_max_share": values[1],
            "diag/teacher_collapsed": float(values[1] > COLLAPSE_SHARE)}


def collapsed_teacher_message(stats: dict[str, float], step: int) -> str | None:
    """A warning when :func:`prototype_usage_stats` flags one-prototype collapse, else ``None``."""
    if not stats.get("diag/teacher_collapsed"):
        return None
    return (f"teacher collapse at step {step}: one prototype takes {stats['diag/teacher_max_share']:.0%} of the "
            f"batch's teacher probability (usage entropy {stats['diag/teacher_usage_entropy']:.2f} nats). "
            "Lower optim.lr, raise loss.koleo_weight or check that the views differ.")


class CollapseMonitor:
    """Reports one-prototype collapse from a *trend*, never from a single (early) check.

    At step 0 a randomly initialised head at a low teacher temperature routinely puts most of the batch's
    probability on one prototype before any update has happened (``make demo`` used to print "teacher
    collapse at step 0"); that is not collapse.  The monitor ignores checks before ``warmup_steps`` and
    reports (once) only when :func:`prototype_usage_stats` flagged the last ``patience`` checks in a row and
    the busiest prototype's share did not shrink over them (a teacher recovering on its own is left alone).
    """

    def __init__(self, warmup_steps: int, patience: int = 3) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.warmup_steps = max(1, int(warmup_steps))
        self.patience = int(patience)
        self.reported = False
        self._shares: list[float] = []

    def update(self, stats: dict[str, float], step: int) -> str | None:
        """Feed one check's stats; returns the warning the first time the trend says collapse."""
        if self.reported or step < self.warmup_steps:
            return None
        if not stats.get("diag/teacher_collapsed"):
            self._shares.clear()
            return None
        self._shares.append(float(stats["diag/teacher_max_share"]))
        if len(self._shares) < self.patience:
            return None
        window = self._shares[-self.patience:]
        if window[-1] < window[0] - 1e-3:
            return None
        self.reported = True
        msg = collapsed_teacher_message(stats, step)
        return None if msg is None else f"{msg} (flagged on {self.patience} checks in a row since the warm-up)"


def uniform_teacher_message(teacher_probs: torch.Tensor, step: int, teacher_temp: float,
                            threshold: float = 0.98) -> str | None:
    """A warning when the teacher's Sinkhorn targets are still (nearly) uniform, else ``None``.

    Sinkhorn-Knopp removes what all samples share, so when the teacher's logits differ across the
    batch by much less than ``teacher_temp`` (a randomly initialised head on a small model), every
    target is ~uniform, the DINO/iBOT cross-entropy is ~log K whatever the student does and the run
    learns nothing from it -- silently, since the loss looks converged.  ``threshold`` is the fraction
    of log K above which the targets count as uniform.
    """
    k = teacher_probs.shape[-1]
    if k < 2 or teacher_probs.numel() == 0:
        return None
    entropy = float(teacher_entropy(teacher_probs))
    if entropy < threshold * math.log(k):
        return None
    return (f"teacher targets are still uniform at step {step} (entropy {entropy:.2f} nats, log K = "
            f"{math.log(k):.2f}): the DINO loss carries no signal. Lower loss.teacher_temp and "
            f"loss.warmup_teacher_temp (now {teacher_temp:g}; a from-scratch tiny model needs ~0.01).")


def _cpu_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # psutil is a wandb/distributed dependency, but do not require it
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0


def system_stats() -> dict[str, float]:
    """Process memory (always) and GPU memory/utilisation (when CUDA is in use).

    ``system/cpu_rss_gb``; on GPU ``system/gpu_memory_gb`` (peak allocated by this process on the
    current device since the last call, then reset) and ``system/gpu_utilization`` (percent, when NVML
    is available).
    """
    out = {"system/cpu_rss_gb": _cpu_rss_bytes() / 1024**3}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()
        out["system/gpu_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 1024**3
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            out["system/gpu_utilization"] = float(torch.cuda.utilization(dev))
        except Exception:  # needs pynvml / amdsmi; not essential
            pass
    return out


# --------------------------------------------------------------------------------------------------
# Attention maps (the figures are drawn by dinocell.evaluate.plots)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_maps(backbone: Any, images: torch.Tensor) -> torch.Tensor:
    """CLS -> patch attention of the last block, (B, heads, h, w), each map summing to 1 over patches.

    ``images`` (B, 1, H, W) with H, W multiples of the patch size.  Register tokens are dropped and the
    remaining patch attention renormalised, so maps are comparable between models with and without
    registers (Darcet et al. 2024, arXiv:2309.16588).
    """
    was_training = backbone.training
    backbone.eval()
    try:
        device = next(backbone.parameters()).device
        attn = backbone.get_last_selfattention(images.to(device, torch.float32)).cpu()
    finally:
        backbone.train(was_training)
    npt = int(backbone.num_prefix_tokens)
    p = int(backbone.patch_size)
    h, w = images.shape[-2] // p, images.shape[-1] // p
    cls_to_patch = attn[:, :, 0, npt:].float()
    cls_to_patch = cls_to_patch / cls_to_patch.sum(-1, keepdim=True).clamp_min(1e-12)
    return cls_to_patch.reshape(images.shape[0], attn.shape[1], h, w)


__all__ = [
    "CollapseMonitor",
    "attention_maps",
    "collapse_stats",
    "collapsed_teacher_message",
    "grad_stats",
    "prototype_usage_stats",
    "system_stats",
    "teacher_entropy",
    "uniform_teacher_message",
]
