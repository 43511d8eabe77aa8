"""Learning-rate schedules, as a multiplier of each group's base lr per step.

- ``step``: the paper's recipe, lr x decay_factor at each epoch in decay_epochs;
- ``cosine``: cosine from the peak down to min_lr_ratio x peak at the last step;
- ``constant``.
All three accept a linear warmup over the first ``warmup_steps`` steps.
"""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


def lr_multiplier(step: int, cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.decay_factor ** sum(1 for e in cfg.decay_epochs if epoch >= e)
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying :func:`lr_multiplier` to every group (keeps lr_mult ratios)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, cfg, steps_per_epoch, total_steps))
