"""Skipping optimiser steps whose loss or gradient is not finite, decided on
the device so that the host never waits for the step (no ``.item()``).

The decision (every rank the same) feeds the fused AdamW's ``found_inf``,
the way torch's GradScaler skips a step: parameters, moments and the step
count stay as they were. The step's keys are not enqueued
(``NegativeQueues.enqueue(keep=...)``). What still happens on a skipped step:
the learning-rate schedule and the run's position advance (as with AMP), and
the key towers take their EMA step towards the unchanged online towers.

The host reads the counts only where it already waits (log steps,
checkpoints): ``read()``.

Used for ZeRO 0 without fp16, where the step owns the optimiser call. ZeRO 1-2
and fp16 go through DeepSpeed's own optimiser wrappers; there the trainer
checks the loss on the host and skips the micro-batch instead
(docs/training.md).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist


class DeviceSkips:
    """Device-side flags and counters of non-finite steps.

    Per accumulation window: ``window`` (0-d bool), set when any micro-batch's
    loss (or the window's gradient norm) was not finite on any rank.
    ``found_inf`` (0-d float32) is the optimiser's view of it. ``counts``
    (3,) int64: steps skipped since start, the current run of skipped steps,
    the longest run since start.
    """

    def __init__(self, device: torch.device, world: int):
        self.world = world
        self.window = torch.zeros((), dtype=torch.bool, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)

    @torch.no_grad()
    def check_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether ``loss`` is finite on every rank: a 0-d bool tensor, the same
        on every rank (one all-reduce, asynchronous to the host on NCCL).
        Collective. A False marks the window."""
        ok = torch.isfinite(loss.detach()).to(torch.int32)
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        ok = ok.bool()
        self.window |= ~ok
        return ok

    @torch.no_grad()
    def check_norm(self, norm: torch.Tensor) -> None:
        """Mark the window when the gradient norm is not finite. Call with the
        norm of the gradients averaged over ranks (the same on every rank)."""
        self.window |= ~torch.isfinite(norm)

    @torch.no_grad()
    def before_step(self) -> None:
        """Hand the window's verdict to the optimiser (its ``found_inf``)."""
        self.found_inf.copy_(self.window)

    @torch.no_grad()
    def after_step(self) -> None:
        """Count the window and open the next one."""
        bad = self.window.to(torch.int64)
        c = self.counts
        c[0] += bad
        c[1] = (c[1] + 1) * bad  # the run of skipped steps goes on, or ends at 0
        c[2] = torch.maximum(c[2], c[1])
        self.window.zero_()

    def read(self) -> Tuple[int, int]:
        """(steps skipped since start, longest run of them): waits for the device."""
        skipped, longest = self.counts[[0, 2]].tolist()
        return int(skipped), int(longest)
