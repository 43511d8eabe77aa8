"""Tiny model, batches and training steps shared by the in-process tests and
the distributed-equivalence test (tests/test_dist_equivalence.py), which
runs the real TrainStep on gloo ranks and in one process."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from user_dist.config import GSEConfig, ModelConfig, TextEncoderConfig
from user_dist.distributed import all_gather_nograd, world_size

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

# tiny_model_cfg() as config overrides, for a real TrainStep: fp32, ZeRO 0,
# no dropout, a constant lr. AdamW with beta1 = beta2 = 0 and eps = 1 moves
# each weight by lr * g / (|g| + 1): smooth in the gradient, so float32
# summation-order differences between N ranks and one process stay small
# (plain Adam turns them into steps of about lr for near-zero gradients).
TRAIN_STEP_OVERRIDES = [
    f"model.embed_size={EMBED}", f"model.region_dim={REGION_DIM}", "model.mlp_hidden=16", "model.gpo_pe_dim=8",
    "model.gpo_hidden=8", "model.text.hidden_size=32", "model.text.num_layers=2", "model.text.num_heads=2",
    "model.text.intermediate_size=64", "model.text.max_position=64", "model.text.dropout=0.0",
    "model.gse.kind=both", f"model.gse.clip_dim={CLIP_DIM}", "model.gse.clip_text_guide=true",
    "model.gse.sge_dropout=0.0", "queue.momentum=0.9", "loss.batch_weight=1.0", "loss.queue_weight=1.0",
    "train.precision=fp32", "train.zero_stage=0", "train.grad_accum=1", "optim.schedule=constant",
    "optim.lr=0.05", "optim.betas=[0.0,0.0]", "optim.eps=1.0", "optim.weight_decay=0.0", "optim.grad_clip=0.0",
]


class GradientTap:
    """A TrainStep clock that copies every gradient when the optimiser phase
    begins: whole, averaged over ranks (ZeRO 0 all-reduces in the backward)."""

    def __init__(self, step):
        self.step, self.grads = step, []

    def __call__(self, phase: str):
        if phase == "optimizer":
            self.grads.append({n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                               for n, p in self.step.engine.module.named_parameters()})
        return contextlib.nullcontext()


def train_steps(mode: str, size_per_rank: int) -> dict:
    """Three optimiser steps of the real TrainStep (DeepSpeed engine, key
    towers, queues, UTO) on this rank's share of STEP_IDS's batches. Needs a
    process group of any size (user_dist.distributed.init_distributed).

    Returns losses (steps,) averaged over ranks, grads (list of {name:
    tensor}), the momentum towers' state and the global queue pool (image,
    text, ids) at the end.
    """
    from user_dist.config import load_config
    from user_dist.train_step import TrainStep

    world, rank = world_size(), dist.get_rank() if dist.is_initialized() else 0
    cfg = load_config(None, TRAIN_STEP_OVERRIDES + [f"queue.mode={mode}", f"queue.size_per_rank={size_per_rank}",
                                                    f"train.batch_size={len(STEP_IDS[0]) // world}"])
    step = TrainStep(cfg, steps_per_epoch=len(STEP_IDS), total_steps=len(STEP_IDS))
    step.clock = tap = GradientTap(step)
    losses = []
    for n, ids in enumerate(STEP_IDS):
        stats = step.micro_step(rank_slice(make_batch(n + 1, len(ids), ids=ids), rank, world), step=n)
        loss = stats["loss"].detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss)
    queue = step.queue
    if queue.sharded:
        pool = tuple(all_gather_nograd(t) for t in (queue.image, queue.text, queue.ids))
    else:
        pool = (queue.image, queue.text, queue.ids)
    return {"losses": torch.stack(losses), "grads": tap.grads, "momentum": step.momentum.state_dict(),
            "pool": pool, "fill": queue.fill, "ptr": queue.ptr}
