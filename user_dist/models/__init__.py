"""The USER two-tower model (see docs/model.md).

``build_model(model_cfg, data_mode)`` builds the image tower for the data
mode ('regions': precomputed region features, 'jpg': a backbone on raw
images), the BERT text tower and, with CGE from online CLIP, the frozen
CLIP image tower.
"""
from __future__ import annotations

from user_dist.config import ModelConfig
from user_dist.models.gpo import GPO
from user_dist.models.image import BackboneTower, RegionTower
from user_dist.models.retrieval import FrozenClip, RetrievalModel
from user_dist.models.text import TextTower

__all__ = ["build_model", "RetrievalModel", "GPO"]

CLIP_SOURCES = ("shards", "online")


def build_model(model_cfg: ModelConfig, data_mode: str) -> RetrievalModel:
    """RetrievalModel for ``data_mode`` 'regions' or 'jpg'."""
    gse = model_cfg.gse
    if data_mode not in ("regions", "jpg"):
        raise ValueError(f"data.mode is '{data_mode}'; valid choices: regions, jpg")
    if gse.clip_source not in CLIP_SOURCES:
        raise ValueError(f"model.gse.clip_source is '{gse.clip_source}'; valid choices: {', '.join(CLIP_SOURCES)}")
    if data_mode == "jpg":
        image_tower = BackboneTower(model_cfg)
        lr_mults = {"image_tower.backbone.": model_cfg.image.lr_mult}
    else:
        image_tower = RegionTower(model_cfg.region_dim, model_cfg)
        lr_mults = {}
    lr_mults["text_tower.encoder."] = model_cfg.text.lr_mult
    clip = None
    if gse.kind in ("cge", "both") and gse.clip_source == "online":
        clip = FrozenClip(gse)
        if clip.dim != gse.clip_dim:
            raise ValueError(f"model.gse.clip_dim is {gse.clip_dim} but {gse.clip_model} gives {clip.dim}-d "
                             f"features; set model.gse.clip_dim={clip.dim}")
    return RetrievalModel(image_tower, TextTower(model_cfg), data_mode, lr_mults, clip)
