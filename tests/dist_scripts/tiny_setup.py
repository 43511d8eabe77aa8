"""Tiny model, batches and training steps shared by the in-process tests and
the gloo rank script (tests/dist_scripts/equivalence_rank.py)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from user_dist.config import GSEConfig, LossConfig, ModelConfig, QueueConfig, TextEncoderConfig
from user_dist.distributed import all_gather_nograd, world_size
from user_dist.loss import uto_loss
from user_dist.models import build_model
from user_dist.momentum import MomentumTowers
from user_dist.queue import NegativeQueues

EMBED, REGION_DIM, CLIP_DIM = 32, 16, 12


def tiny_model_cfg(kind: str = "both", clip_text_guide: bool = True, **gse) -> ModelConfig:
    """embed 32, regions 16-d, BERT 2 layers x 32, dropout off."""
    return ModelConfig(
        embed_size=EMBED, region_dim=REGION_DIM, mlp_hidden=16, gpo_pe_dim=8, gpo_hidden=8,
        text=TextEncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                               max_position=64, dropout=0.0),
        gse=GSEConfig(kind=kind, clip_dim=CLIP_DIM, clip_text_guide=clip_text_guide, sge_dropout=0.0, **gse))


def make_batch(seed: int, B: int, R: int = 6, L: int = 9, ids: Optional[List[int]] = None) -> Dict[str, torch.Tensor]:
    """A regions-mode batch with variable region counts (>= 1) and caption lengths (>= 2)."""
    g = torch.Generator().manual_seed(seed)
    n_regions = torch.randint(1, R + 1, (B,), generator=g)
    n_tokens = torch.randint(2, L + 1, (B,), generator=g)
    region_mask = torch.arange(R)[None] < n_regions[:, None]
    attention_mask = (torch.arange(L)[None] < n_tokens[:, None]).long()
    regions = torch.randn(B, R, REGION_DIM, generator=g) * region_mask[..., None]
    input_ids = torch.randint(1000, 2000, (B, L), generator=g) * attention_mask
    return {"regions": regions, "region_mask": region_mask, "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_ids": torch.tensor(ids if ids is not None else range(seed * 100, seed * 100 + B)),
            "clip_image": torch.nn.functional.normalize(torch.randn(B, CLIP_DIM, generator=g), dim=-1),
            "clip_text": torch.nn.functional.normalize(torch.randn(B, CLIP_DIM, generator=g), dim=-1)}


def rank_slice(batch: Dict[str, torch.Tensor], rank: int, world: int) -> Dict[str, torch.Tensor]:
    b = batch["image_ids"].shape[0] // world
    return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}


# Global batches of 8 pairs: ids repeat inside a step (across the two ranks'
# halves) and across steps (so the queue holds captions of the same image).
STEP_IDS = [[0, 1, 2, 3, 4, 1, 6, 7], [8, 3, 10, 11, 12, 13, 0, 15], [16, 17, 8, 19, 20, 21, 22, 2]]


def train_steps(mode: str, size_per_rank: int, rank: int = 0, lr: float = 0.05) -> dict:
    """Three SGD steps of the whole method on this rank's share of STEP_IDS's
    batches. Gradients and losses are averaged over ranks like the engine does.

    Returns losses (steps,), grads (list of {name: tensor}), the momentum
    towers' state and the global queue pool (image, text, ids) at the end.
    """
    world = world_size()
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(), "regions")
    qcfg = QueueConfig(size_per_rank=size_per_rank, mode=mode, momentum=0.9)
    momentum = MomentumTowers(model, qcfg)
    queue = NegativeQueues(qcfg, EMBED)
    loss_cfg = LossConfig(batch_weight=1.0, queue_weight=1.0)
    losses, grads = [], []
    for step, ids in enumerate(STEP_IDS):
        batch = rank_slice(make_batch(step + 1, len(ids), ids=ids), rank, world)
        img, txt = model(batch)
        img_k, txt_k = momentum.encode(batch)
        loss, _ = uto_loss(img, txt, img_k, txt_k, batch["image_ids"], queue, loss_cfg)
        loss.backward()
        step_grads = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if world > 1:
                    dist.all_reduce(g)
                    g /= world
                step_grads[name] = g.clone()
                p -= lr * g
                p.grad = None
            loss = loss.detach().clone()
            if world > 1:
                dist.all_reduce(loss)
                loss /= world
        losses.append(loss)
        grads.append(step_grads)
        momentum.update(model)
        queue.enqueue(img_k, txt_k, batch["image_ids"])
    if queue.sharded:
        pool = tuple(all_gather_nograd(t) for t in (queue.image, queue.text, queue.ids))
    else:
        pool = (queue.image, queue.text, queue.ids)
    return {"losses": torch.stack(losses), "grads": grads, "momentum": momentum.state_dict(),
            "pool": pool, "fill": queue.fill, "ptr": queue.ptr}
