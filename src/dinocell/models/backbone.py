"""The DINOv3 ViT backbone (timm's ``Eva`` with DINOv3 RoPE, register tokens and LayerScale).

Why a wrapper around timm instead of timm's own ``forward_features``: DINO/iBOT training needs what
timm's Eva does not have — a learned ``mask_token`` that replaces masked patch embeddings before the
prefix tokens are added (iBOT, Zhou et al. 2022, arXiv:2111.07832), and the dinov3-style output dict
(CLS / registers / patches / pre-norm tokens).  We re-assemble the forward pass from timm's public
sub-modules (``patch_embed``, ``cls_token``, ``reg_token``, ``rope``, ``blocks``, ``norm``), so
timm's numerics and its conversion of the official DINOv3 weights (Siméoni et al. 2025,
arXiv:2508.10104) are reused unchanged.

Crops are single-channel (``in_chans=1``): official RGB patch filters are summed over the colour axis,
which is exactly the same as feeding the grey image repeated three times.  A patch-16 checkpoint can
initialise a patch-8 model by FlexiViT resampling of the kernel (Beyer et al. 2023, arXiv:2212.08013).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dinocell.errors import ConfigError, DataError, UserError, first_line
from dinocell.models.weights import load_state_checked, load_weights_file

EXPORT_FORMAT = "dinocell-backbone"
EXPORT_VERSION = 1
_ROPE_PERIODS_KEY = "rope_periods"  # non-persistent in timm; exported explicitly (official values are bf16)


class DinoBackbone(nn.Module):
    """timm's DINOv3 ``Eva`` plus a learned mask token and a dinov3-style ``forward_features``.

    Attributes: ``model`` (the timm Eva), ``mask_token`` (1, D), ``embed_dim``, ``patch_size``,
    ``in_chans``, ``num_prefix_tokens`` (1 + registers), ``n_register_tokens``, ``n_blocks``,
    ``timm_name`` and ``arch`` (everything needed to rebuild the module).
    """

    def __init__(self, model: nn.Module, timm_name: str, arch: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.timm_name = timm_name
        self.arch = dict(arch)
        self.embed_dim: int = int(model.embed_dim)
        self.patch_size: int = int(model.patch_embed.patch_size[0])
        self.in_chans: int = int(model.patch_embed.proj.in_channels)
        self.num_prefix_tokens: int = int(model.num_prefix_tokens)
        self.n_register_tokens: int = 0 if model.reg_token is None else int(model.reg_token.shape[1])
        self.n_blocks: int = len(model.blocks)
        # dinov3 keeps the mask token as (1, D) and initialises it to zero; same here so that the
        # official tensor loads as is.
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        self.sidecar: dict[str, Any] = {}  # an old export's JSON sidecar (load_export_backbone)

    def set_rope_rescale(self, factor: float | None) -> None:
        """Train-mode RoPE coordinate rescaling by one log-uniform factor in ``[1/factor, factor]`` per forward
        (dinov3 ``pos_embed_rope_rescale_coords``; ``None``: off).  Eval mode is never augmented.

        timm's ``RotaryEmbeddingDinoV3`` implements the same draw (one shared factor, ``uniform_`` of the log
        on the grid's float32 CPU tensor, as dinov3's ``RopePositionEmbedding``; tests/train/
        test_parity_official.py checks the values); it is configured after construction so any timm name works.
        """
        rope = self.model.rope
        if rope is None:
            return
        if factor is not None and factor < 1:
            raise ConfigError(f"config key 'model.rope_rescale_coords' must be >= 1 or null, got {factor}")
        rope.rescale_coords = None if factor is None else float(factor)
        rope.aug_active = any(v is not None for v in (rope.shift_coords, rope.jitter_coords, rope.rescale_coords))

    # ------------------------------------------------------------------ weights
    def load_checked(self, state: Mapping[str, torch.Tensor], source: str,
                     rope_periods: torch.Tensor | None = None) -> None:
        """Strict load with a one-line ``UserError`` naming the first few missing/unexpected/mis-shaped keys,
        then ``rope_periods`` if given (a non-persistent buffer no state dict carries; official values are
        bf16-rounded, timm recomputes its own)."""
        arch = self.arch
        load_state_checked(self, state, source, f"{self.timm_name} (embed_dim={arch['embed_dim']}, "
                                                f"depth={arch['depth']}, num_heads={arch['num_heads']}, "
                                                f"patch_size={arch['patch_size']})")
        rope = self.model.rope
        if rope_periods is None or rope is None or rope_periods.shape != rope.periods.shape:
            return
        with torch.no_grad():
            rope.periods.copy_(rope_periods.to(rope.periods.dtype))

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4:
            raise DataError(f"backbone expects images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise DataError(f"backbone expects {self.in_chans} input channel(s), got {x.shape[1]}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % self.patch_size or w % self.patch_size:
            raise DataError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def prepare_tokens(
        self, x: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patchify, apply the mask token, prepend CLS + registers; also return the RoPE table.

        Mirrors timm ``Eva._pos_embed`` for DINOv3 (no absolute position embedding; RoPE built for
        this image's grid, so any size that is a multiple of the patch size works).
        """
        gh, gw = self._check_input(x)
        m = self.model
        t = m.patch_embed(x)  # dynamic_img_size=True: (B, H, W, D)
        b = t.shape[0]
        t = t.reshape(b, gh * gw, self.embed_dim)
        if masks is not None:
            if masks.shape != (b, gh * gw):
                raise ValueError(f"masks must have shape {(b, gh * gw)}, got {tuple(masks.shape)}")
            t = torch.where(masks.to(torch.bool).unsqueeze(-1), self.mask_token.to(t.dtype).unsqueeze(0), t)
        prefix = [m.cls_token.expand(b, -1, -1)]
        if m.reg_token is not None:
            prefix.append(m.reg_token.expand(b, -1, -1))
        t = torch.cat([p.to(t.dtype) for p in prefix] + [t], dim=1)
        t = m.pos_drop(t)
        rope = m.rope.get_embed(shape=(gh, gw)) if m.rope is not None else None
        t = m.norm_pre(t)
        return t, rope

    def _run_block(self, blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        if self.model.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, rope, use_reentrant=False)
        return blk(x, rope=rope)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Tokens in the dinov3 layout.

        ``masks`` (B, N) bool, True = replace that patch embedding by ``mask_token`` (iBOT).
        Returns ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_patchtokens``
        (B, N, D), ``x_prenorm`` (B, 1+R+N, D) and ``masks`` (as given).
        """
        t, rope = self.prepare_tokens(x, masks)
        for blk in self.model.blocks:
            t = self._run_block(blk, t, rope)
        t_norm = self.model.norm(t)
        npt = self.num_prefix_tokens
        return {
            "x_norm_clstoken": t_norm[:, 0],
            "x_norm_regtokens": t_norm[:, 1:npt],
            "x_norm_patchtokens": t_norm[:, npt:],
            "x_prenorm": t,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised CLS token (B, D): the image embedding."""
        return self.forward_features(x)["x_norm_clstoken"]

    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block, (B, heads, T, T) with T = 1 + R + N (for attention maps).

        Re-computes the last block's q/k from timm's ``EvaAttention`` parameters (fused qkv layout).
        """
        from timm.layers import apply_rot_embed_cat

        t, rope = self.prepare_tokens(x)
        for blk in self.model.blocks[:-1]:
            t = blk(t, rope=rope)
        last = self.model.blocks[-1]
        attn = last.attn
        if getattr(attn, "qkv", None) is None:
            raise NotImplementedError("attention maps need a fused-qkv attention block")
        h = last.norm1(t)
        b, n, _ = h.shape
        bias = None
        if attn.q_bias is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(h, attn.qkv.weight, bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        if rope is not None:
            npt = attn.num_prefix_tokens
            half = attn.rotate_half
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    # ------------------------------------------------------------------ optimiser helpers
    def layer_id(self, param_name: str) -> int:
        """Depth index of a parameter for layer-wise lr decay (dinov2/3 convention).

        0 = embeddings (patch embed, CLS, registers, mask token); i + 1 = block i; ``n_blocks + 1`` =
        final norm.  Names are as in ``self.named_parameters()``.
        """
        name = param_name.removeprefix("model.")
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith(("patch_embed", "cls_token", "reg_token", "mask_token", "pos_embed", "norm_pre")):
            return 0
        return self.n_blocks + 1


# ---------------------------------------------------------------------------------------- building


def _check_timm_name(name: str) -> None:
    import timm
    from timm.models import is_model, model_entrypoint

    if not is_model(name):
        known = ", ".join(timm.list_models("*dinov3")[:8])
        raise ConfigError(f"unknown timm model '{name}' (DINOv3 models: {known})")
    if model_entrypoint(name).__module__ != "timm.models.eva":
        raise ConfigError(f"timm model '{name}' is not a DINOv3 ViT (use e.g. 'vit_small_patch16_dinov3')")


def _check_heads(embed_dim: int, num_heads: int) -> None:
    if embed_dim % num_heads or (embed_dim // num_heads) % 4:
        raise ConfigError(
            f"model.embed_dim ({embed_dim}) / model.num_heads ({num_heads}) must be an integer divisible "
            "by 4 (2-D RoPE)"
        )


def _create(
    timm_name: str,
    in_chans: int = 1,
    patch_size: int = 16,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    layerscale_init: float | None = None,
) -> DinoBackbone:
    """Build an untrained backbone from architecture arguments (shared by config build and export load)."""
    import timm
    from timm.layers import RotaryEmbeddingDinoV3

    _check_timm_name(timm_name)
    if in_chans < 1:
        raise ConfigError(f"config key 'model.in_chans' must be >= 1, got {in_chans}")
    if patch_size < 1:
        raise ConfigError(f"config key 'model.patch_size' must be >= 1, got {patch_size}")
    overrides = {k: v for k, v in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads))
                 if v is not None}
    extra = {} if layerscale_init is None else {"init_values": float(layerscale_init)}
    for k, v in overrides.items():
        if v < 1:
            raise ConfigError(f"config key 'model.{k}' must be >= 1, got {v}")
    if embed_dim is not None and num_heads is not None:
        _check_heads(embed_dim, num_heads)
    model = timm.create_model(
        timm_name,
        pretrained=False,
        num_classes=0,
        global_pool="token",
        in_chans=in_chans,
        patch_size=patch_size,
        img_size=img_size,
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
        **overrides,
        **extra,
    )
    if model.pos_embed is not None or not isinstance(model.rope, RotaryEmbeddingDinoV3) or model.cls_token is None:
        raise ConfigError(f"timm model '{timm_name}' is not a DINOv3-style ViT (RoPE, CLS, no abs. pos. embed)")
    d, heads = int(model.embed_dim), int(model.blocks[0].attn.num_heads)
    _check_heads(d, heads)
    arch = {
        "timm_name": timm_name,
        "in_chans": in_chans,
        "patch_size": patch_size,
        "embed_dim": d,
        "depth": len(model.blocks),
        "num_heads": heads,
        "img_size": img_size,
    }
    return DinoBackbone(model, timm_name, arch)


def build_backbone(cfg: Any, img_size: int = 224) -> DinoBackbone:
    """Build the backbone from a ``ModelConfig`` (and load ``cfg.pretrained`` if set).

    ``pretrained`` is a dinocell export folder (:mod:`dinocell.models.timm_export`), an old dinocell
    ``.safetensors`` export (with its JSON sidecar), or else an official DINOv3 ``.pth``
    (:func:`load_official_weights`).
    """
    bb = _create(
        cfg.name,
        in_chans=cfg.in_chans,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        img_size=img_size,
        drop_path_rate=cfg.drop_path_rate,
        layerscale_init=getattr(cfg, "layerscale_init", None),
    )
    if cfg.act_checkpointing:
        bb.model.set_grad_checkpointing(True)
    if cfg.pretrained:
        from dinocell.models.timm_export import is_export_folder, load_folder_weights

        if is_export_folder(cfg.pretrained):
            load_folder_weights(bb, cfg.pretrained)
        elif str(cfg.pretrained).endswith(".safetensors"):
            load_export_weights(bb, cfg.pretrained)
        else:
            load_official_weights(bb, cfg.pretrained)
    return bb


# ---------------------------------------------------------------------------------------- weights


def _unwrap(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Accept the released flat state dict and common training-checkpoint wrappers."""
    for key in ("teacher", "model_ema", "model", "module", "state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = dict(sd[key])
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # training checkpoint: drop the heads
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_official_weights(backbone: DinoBackbone, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an official DINOv3 ``.pth`` (local file) into ``backbone`` in place.

    Conversion to timm's layout is timm's own ``eva.checkpoint_filter_fn``; before it we (1) keep the
    official ``mask_token`` for our mask token, (2) fold the masked qkv bias, (3) adapt input channels
    (RGB -> 1: filters summed, i.e. the grey image repeated 3x), (4) FlexiViT-resample the patch kernel
    when the patch sizes differ.  Returns a small report of what was adapted.
    """
    from timm.layers import resample_patch_embed
    from timm.models import adapt_input_conv
    from timm.models.eva import checkpoint_filter_fn

    sd = _unwrap(load_weights_file(path, "pretrained weights"))
    report: dict[str, Any] = {"path": str(path)}
    source = str(path)
    mask_token = sd.pop("mask_token", None)
    periods = sd.get("rope_embed.periods")

    # qkv bias: official dinov3 multiplies by bias_mask (zero on k); timm keeps only q and v biases.
    model_has_qkv_bias = backbone.model.blocks[0].attn.q_bias is not None
    for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
        mask = sd.pop(k[: -len("bias")] + "bias_mask", None)
        bias = sd[k] * mask.to(sd[k].dtype) if mask is not None and torch.isfinite(mask).all() else sd[k]
        if model_has_qkv_bias:
            sd[k] = bias
        elif bool(torch.any(bias != 0)):
            raise UserError(
                f"{path} has non-zero qkv biases but '{backbone.timm_name}' has none; "
                f"use model.name={backbone.timm_name}_qkvb"
            )
        else:
            del sd[k]  # all-zero biases (the distilled releases): nothing to load

    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        report["checkpoint_in_chans"] = int(w.shape[1])
        report["checkpoint_patch_size"] = int(w.shape[-1])
        if w.shape[1] != backbone.in_chans:
            w = adapt_input_conv(backbone.in_chans, w.float(), base_chans=int(w.shape[1])).to(w.dtype)
        ps = backbone.patch_size
        if tuple(w.shape[-2:]) != (ps, ps):
            w = resample_patch_embed(w.float(), [ps, ps], interpolation="bicubic", antialias=True).to(w.dtype)
        sd["patch_embed.proj.weight"] = w

    if "storage_tokens" in sd:
        state = checkpoint_filter_fn(sd, backbone.model)
    else:  # not the DINOv3 layout: compare raw keys (timm's filter would guess at other formats)
        state = dict(sd)
        source = f"{path} (no 'storage_tokens': not an official DINOv3 file)"
    state = {f"model.{k}": v for k, v in state.items()}
    if mask_token is not None:
        state["mask_token"] = mask_token.reshape(1, -1) if mask_token.numel() == backbone.embed_dim else mask_token
    else:
        state["mask_token"] = backbone.mask_token.detach().clone()  # e.g. a fine-tuned release without it
        report["mask_token"] = "initialised (not in checkpoint)"
    backbone.load_checked(state, source, periods)
    return report


# ------------------------------------------------------------------- old exports (read only)
# ``.safetensors`` + ``<file>.json`` sidecar, written by dinocell before the timm folder became the one
# export format (:mod:`dinocell.models.timm_export`); still read, never written.


def _read_export(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    p = Path(path)
    side = Path(f"{p}.json")
    if not p.is_file():
        raise UserError(f"exported backbone not found: {p}")
    if not side.is_file():
        raise UserError(f"exported backbone {p} has no sidecar {side.name}")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"sidecar {side} is not valid JSON ({first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or not isinstance(meta.get("model"), dict):
        raise UserError(f"sidecar {side} is not a {EXPORT_FORMAT} description")
    try:
        tensors = load_file(str(p), device="cpu")
    except Exception as e:
        raise UserError(f"cannot read {p} as safetensors: {first_line(e)}") from None
    return meta, tensors


def load_export_weights(backbone: DinoBackbone, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an old ``.safetensors`` export's weights into an existing ``backbone`` (architectures must match)."""
    meta, tensors = _read_export(path)
    periods = tensors.pop(_ROPE_PERIODS_KEY, None)
    backbone.load_checked(tensors, str(path), periods)
    return meta


def load_export_backbone(path: str | os.PathLike[str]) -> DinoBackbone:
    """Rebuild an old ``.safetensors`` export in eval mode; its sidecar dict is kept as ``.sidecar``.

    The reader of one format: callers load models through :func:`dinocell.models.loading.load_model`."""
    meta, tensors = _read_export(path)
    arch = meta["model"]
    try:
        bb = _create(
            str(arch["timm_name"]),
            in_chans=int(arch["in_chans"]),
            patch_size=int(arch["patch_size"]),
            embed_dim=int(arch["embed_dim"]),
            depth=int(arch["depth"]),
            num_heads=int(arch["num_heads"]),
            img_size=int(arch.get("img_size", 224)),
        )
    except KeyError as e:
        raise UserError(f"sidecar of {path} lacks model key {e}") from None
    periods = tensors.pop(_ROPE_PERIODS_KEY, None)
    bb.load_checked(tensors, str(path), periods)
    bb.sidecar = meta
    return bb.eval()


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters (for logs)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
    "DinoBackbone",
    "build_backbone",
    "count_parameters",
    "load_export_backbone",
    "load_export_weights",
    "load_official_weights",
]
