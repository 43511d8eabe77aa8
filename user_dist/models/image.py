"""Image towers: region features (precomputed) or a backbone on raw images.

Region tower (method.md): [SGE on raw regions] -> f_i = Linear(v_i) + MLP(v_i)
-> [CGE enhancement in the embed space] -> GPO over real regions -> L2 norm.
The backbone tower runs an open_clip vision transformer or a timm model and
feeds its patch/grid features to the same path as regions (all real).

``set_grad_checkpointing`` (``train.grad_checkpointing``): the backbone
recomputes its blocks in backward through its library's own switch
(non-reentrant torch.utils.checkpoint), SGE through
user_dist.models.recompute.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from user_dist.config import ConfigError, ImageEncoderConfig, ModelConfig
from user_dist.models.gpo import GPO
from user_dist.models.gse import SGE, ClipGuide, MaskedBatchNorm, enhance


class Projection(nn.Module):
    """f_i = Linear(F, E)(v_i) + MLP(v_i), MLP = Linear(F, H) -> BN -> ReLU -> Linear(H, E).

    (B, R, F) -> (B, R, E); the BatchNorm sees real regions only.
    """

    def __init__(self, in_dim: int, hidden: int, embed_size: int, sync_norm: bool):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_size)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.mlp_in = nn.Linear(in_dim, hidden)
        self.mlp_norm = MaskedBatchNorm(hidden, sync=sync_norm)
        self.mlp_out = nn.Linear(hidden, embed_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.mlp_out(F.relu(self.mlp_norm(self.mlp_in(x), mask)))


class RegionTower(nn.Module):
    """Regions (B, R, F) + mask (B, R) [+ CLIP image features (B, clip_dim)] -> (B, E)."""

    def __init__(self, region_dim: int, cfg: ModelConfig):
        super().__init__()
        gse = cfg.gse
        self.enhance_lambda = gse.enhance_lambda
        self.sge = (SGE(region_dim, gse.sge_dropout, gse.enhance_lambda, cfg.sync_norm,
                        gse.paper_regions if gse.paper_batchnorm else None)
                    if gse.kind in ("sge", "both") else None)
        self.proj = Projection(region_dim, cfg.mlp_hidden, cfg.embed_size, cfg.sync_norm)
        self.clip_guide = (ClipGuide(gse.clip_dim, cfg.embed_size, cfg.sync_norm)
                           if gse.kind in ("cge", "both") else None)
        self.gpo = GPO(cfg.gpo_pe_dim, cfg.gpo_hidden)

    @property
    def needs_clip(self) -> bool:
        return self.clip_guide is not None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint SGE, the one part with many (B, R, D) intermediates
        (the projection, CGE and GPO keep theirs)."""
        if self.sge is not None:
            self.sge.checkpointing = enable

    def forward(self, regions: torch.Tensor, mask: torch.Tensor,
                clip_image: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = regions.to(self.proj.fc.weight.dtype)
        if self.sge is not None:
            x = self.sge(x, mask)
        x = self.proj(x, mask)  # (B, R, E)
        if self.clip_guide is not None:
            x = enhance(x, self.clip_guide(clip_image), mask, self.enhance_lambda)
        return F.normalize(self.gpo(x, mask), dim=-1)


def parse_backbone(spec: str) -> Tuple[str, str]:
    """'open_clip:<name>' | 'timm:<name>' -> (library, name)."""
    lib, _, name = spec.partition(":")
    if lib not in ("open_clip", "timm") or not name:
        raise ValueError(f"model.image.backbone is '{spec}'; expected 'open_clip:<model name>' "
                         "(e.g. open_clip:ViT-B-32) or 'timm:<model name>' (e.g. timm:resnet50)")
    return lib, name


def open_clip_visual(name: str, weights: str) -> nn.Module:
    """The vision tower of open_clip model ``name``; CLIP weights from the
    local file ``weights`` or random init when ''."""
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model '{name}'; valid names: open_clip.list_models()")
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"open_clip weights '{weights}' not found: give a local checkpoint file "
                                "(no download at run time) or '' for random init")
    return open_clip.create_model(name, pretrained=weights or None).visual


class Backbone(nn.Module):
    """Raw images (B, 3, H, W) -> grid/patch features (B, N, C), ``dim`` = C."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        lib, name = parse_backbone(cfg.backbone)
        self.lib = lib
        if lib == "open_clip":
            self.net = open_clip_visual(name, cfg.weights)
            if not hasattr(self.net, "output_tokens") or not hasattr(self.net, "ln_post"):
                raise ValueError(f"open_clip model '{name}' has no vision transformer tokens; use a ViT "
                                 f"(e.g. open_clip:ViT-B-32) or a timm backbone (timm:<name>)")
            self.net.output_tokens = True  # forward -> (pooled, patch tokens after ln_post)
            self.dim = self.net.ln_post.normalized_shape[0]
        else:
            import timm

            self.net = timm.create_model(name, pretrained=False, num_classes=0)
            if cfg.weights:
                self.net.load_state_dict(_load_weights(cfg.weights), strict=False)
            self.dim = self.net.num_features
        self.frozen = cfg.freeze
        if cfg.freeze:
            self.net.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen means a fixed function: no dropout, BatchNorm statistics as loaded.
        super().train(mode)
        if self.frozen:
            self.net.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The library's own switch. A frozen backbone keeps no activations
        for backward (nothing in it needs a gradient): left as it is."""
        if self.frozen:
            return
        if self.lib == "timm":
            from timm.layers import set_reentrant_ckpt

            # Non-reentrant, whatever TIMM_REENTRANT_CKPT says: the reentrant
            # variant gives the blocks' weights no gradient when the input
            # (the images) needs none.
            set_reentrant_ckpt(False)
        setter = getattr(self.net, "set_grad_checkpointing", None)
        try:
            if setter is None:
                raise NotImplementedError("no set_grad_checkpointing")
            setter(enable)
        except (AssertionError, NotImplementedError) as exc:
            raise ConfigError(f"train.grad_checkpointing=true: the {self.lib} backbone '{type(self.net).__name__}' "
                              f"(model.image.backbone) cannot checkpoint its activations ({exc}); set "
                              "train.grad_checkpointing=false or pick a backbone that can (open_clip ViTs, timm "
                              "ViTs, ConvNeXts, ResNets)") from exc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(next(self.net.parameters()).dtype)
        if self.lib == "open_clip":
            return self.net(images)[1]  # (B, N, C) patch tokens, class token excluded
        feats = self.net.forward_features(images)
        if feats.ndim == 4:  # CNN grid (B, C, H, W) -> (B, H*W, C)
            return feats.flatten(2).transpose(1, 2)
        return feats[:, getattr(self.net, "num_prefix_tokens", 0):]  # ViT: drop class/register tokens


def _load_weights(path: str) -> dict:
    """A state_dict from a local .safetensors or torch file (never unpickled)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.image.weights '{path}' not found: give a local .safetensors/.pt file "
                                "or '' for random init")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class BackboneTower(nn.Module):
    """Images (B, 3, H, W) [+ CLIP image features] -> (B, E)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = Backbone(cfg.image)
        self.head = RegionTower(self.backbone.dim, cfg)

    @property
    def needs_clip(self) -> bool:
        return self.head.needs_clip

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
        self.head.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor, clip_image: Optional[torch.Tensor] = None) -> torch.Tensor:
        feats = self.backbone(images)  # (B, N, C)
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        return self.head(feats, mask, clip_image)
