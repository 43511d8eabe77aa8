"""The two-tower retrieval model: the DeepSpeed engine's module.

``forward(batch) -> (img, txt)``, both (B, E), L2-normalised. CGE's CLIP
features come from the batch (``clip_image``, ``clip_text``) or, with
``model.gse.clip_source='online'``, from a frozen open_clip image tower run
on ``batch['images']``. Online features are ``normalize(visual(images))``,
the L2-normalised CLIP image embedding: shards' clip_image.npy must hold the
same thing for both sources to agree.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from user_dist.config import GSEConfig, OptimConfig

Batch = Dict[str, torch.Tensor]


class FrozenClip(nn.Module):
    """A frozen open_clip image tower: images (B, 3, H, W) -> (B, D) unit norm.

    Always in eval mode, never trained; the momentum towers share it rather
    than copy it (see user_dist.momentum).
    """

    def __init__(self, gse: GSEConfig):
        super().__init__()
        from user_dist.models.image import open_clip_visual, parse_backbone

        lib, name = parse_backbone(gse.clip_model)
        if lib != "open_clip":
            raise ValueError(f"model.gse.clip_model is '{gse.clip_model}'; online CLIP needs 'open_clip:<name>'")
        self.visual = open_clip_visual(name, gse.clip_weights).eval().requires_grad_(False)
        self.dim = self.visual.output_dim

    def train(self, mode: bool = True) -> "FrozenClip":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.visual(images.to(next(self.visual.parameters()).dtype))
        return F.normalize(feats.float(), dim=-1)


class RetrievalModel(nn.Module):
    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, data_mode: str,
                 lr_mults: Dict[str, float], clip: Optional[FrozenClip] = None):
        """image_tower: RegionTower ('regions') or BackboneTower ('jpg');
        lr_mults: learning-rate multiplier per top-level parameter prefix
        (e.g. {'text_tower.encoder.': 0.1}); clip: the online CLIP or None."""
        super().__init__()
        self.image_tower, self.text_tower, self.clip = image_tower, text_tower, clip
        self.data_mode = data_mode
        self.lr_mults = dict(lr_mults)

    def _clip_image(self, batch: Batch) -> Optional[torch.Tensor]:
        if not self.image_tower.needs_clip:
            return None
        if "clip_image" in batch:
            return batch["clip_image"]
        if self.clip is not None and "images" in batch:
            return self.clip(batch["images"])
        raise ValueError(
            "CGE (model.gse.kind=cge|both) needs CLIP image features, but the batch has no 'clip_image' "
            + ("and no 'images' to run the online CLIP model on; regions-mode shards must carry "
               "clip_image.npy (build them with CLIP features)" if self.clip is not None else
               "(the shards carry no clip_image.npy); build the shards with CLIP features, or set "
               "model.gse.clip_source=online with data.mode=jpg"))

    def encode_image(self, batch: Batch) -> torch.Tensor:
        """(B, E), unit norm."""
        clip = self._clip_image(batch)
        if self.data_mode == "jpg":
            return self.image_tower(batch["images"], clip)
        return self.image_tower(batch["regions"], batch["region_mask"], clip)

    def encode_text(self, batch: Batch) -> torch.Tensor:
        """(B, E), unit norm."""
        clip = None
        if self.text_tower.needs_clip:
            if "clip_text" not in batch:
                raise ValueError("model.gse.clip_text_guide=true needs the batch's 'clip_text' (the shards' "
                                 "clip_text.npy); online CLIP text features are not supported (they need the "
                                 "raw captions): build the shards with CLIP features or set "
                                 "model.gse.clip_text_guide=false")
            clip = batch["clip_text"]
        return self.text_tower(batch["input_ids"], batch["attention_mask"], clip)

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(batch), self.encode_text(batch)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """``train.grad_checkpointing``: each tower recomputes its big
        activations in backward instead of keeping them (the text encoder's
        layers, the backbone's blocks, SGE); gradients stay the same.
        Call it on the online towers only, after the key towers are copied:
        those never run a backward. Raises ConfigError for a tower that
        cannot checkpoint. The frozen online CLIP keeps no activations."""
        self.image_tower.set_grad_checkpointing(enable)
        self.text_tower.set_grad_checkpointing(enable)

    def compile_towers(self, mode: str = "default") -> None:
        """torch.compile the towers' parts in place (parameter names unchanged):
        every child module of each tower but single Linears, which gain
        nothing. GPO's GRU, which Dynamo cannot trace, stays eager
        (``GPO.weights_by_length``): its pooling compiles in two graphs around
        it. Compiling parts instead of the whole forward confines that break
        to GPO instead of every enclosing graph."""
        for tower in (self.image_tower, self.text_tower):
            for child in tower.children():
                if not isinstance(child, nn.Linear):
                    child.compile(mode=mode)

    def train(self, mode: bool = True) -> "RetrievalModel":
        super().train(mode)
        if self.clip is not None:
            self.clip.eval()
        return self

    def param_groups(self, optim_cfg: OptimConfig) -> List[dict]:
        """Optimiser groups: (lr multiplier) x (decay or not).

        Weight decay applies to matrices and embeddings (ndim >= 2), never to
        biases and norm scales. Each group carries ``lr`` (already
        multiplied), ``lr_mult`` (for schedulers that rescale lr) and a
        ``name``. Frozen parameters (the online CLIP, a frozen backbone) are
        left out.
        """
        groups: Dict[Tuple[float, bool], dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            mult = next((m for prefix, m in self.lr_mults.items() if name.startswith(prefix)), 1.0)
            decay = p.ndim >= 2
            key = (mult, decay)
            if key not in groups:
                groups[key] = {"name": f"lr_x{mult:g}_{'decay' if decay else 'no_decay'}", "params": [],
                               "lr": optim_cfg.lr * mult, "lr_mult": mult,
                               "weight_decay": optim_cfg.weight_decay if decay else 0.0}
            groups[key]["params"].append(p)
        return list(groups.values())
