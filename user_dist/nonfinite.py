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
and fp16 go through DeepSpeed's own optimiser wrappers; there the step checks
the loss on the host and drops the micro-batch instead (:class:`HostSkips`,
docs/training.md).

Either way one :class:`SkipPolicy` counts the skips, reports them and ends the
run after ``train.max_nonfinite_in_a_row`` in a row, with one message.
"""
from __future__ import annotations

import logging
from typing import Tuple, Union

import torch

from . import distributed as du

log = logging.getLogger("user_dist")


class DeviceSkips:
    """Device-side flags and counters of non-finite steps.

    What it skips: optimiser steps (their loss or gradient norm was not
    finite); the run's position still advances over them.

    Per accumulation window: ``window`` (0-d bool), set when any micro-batch's
    loss (or the window's gradient norm) was not finite on any rank.
    ``found_inf`` (0-d float32) is the optimiser's view of it. ``counts``
    (3,) int64: steps skipped since start, the current run of skipped steps,
    the longest run since start.
    """

    unit = "optimiser step(s)"
    exact = False  # read at log steps, after the fact: "by step N"

    def __init__(self, device: torch.device):
        self.window = torch.zeros((), dtype=torch.bool, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)

    @torch.no_grad()
    def check_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether ``loss`` is finite on every rank: a 0-d bool tensor, the same
        on every rank (one all-reduce, asynchronous to the host on NCCL).
        Collective. A False marks the window."""
        ok = du.agree(torch.isfinite(loss.detach()), "all").bool()
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


class HostSkips:
    """Host-side counts of micro-batches dropped for a non-finite loss, where
    DeepSpeed's optimiser wrappers own the step (ZeRO 1-2, fp16): the loss is
    checked before the backward, on every rank alike, and a bad micro-batch
    never reaches the optimiser. The same interface as :class:`DeviceSkips`;
    a dropped micro-batch does not count towards the optimiser step."""

    unit = "micro-batch(es)"
    exact = True  # known at once: "at step N"

    def __init__(self) -> None:
        self.skipped = self.run = self.longest = 0

    def check_loss(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every rank (a host read; collective)."""
        ok = bool(du.agree(torch.isfinite(loss.detach()), "all"))
        self.run = 0 if ok else self.run + 1
        self.skipped += not ok
        self.longest = max(self.longest, self.run)
        return ok

    def check_norm(self, norm: torch.Tensor) -> None:
        """Nothing to do: DeepSpeed's wrappers skip a step whose gradients overflow."""

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def read(self) -> Tuple[int, int]:
        """(micro-batches dropped since start, longest run of them)."""
        return self.skipped, self.longest


class SkipPolicy:
    """One counter and one limit for everything skipped for non-finite values.

    ``update`` folds what ``counts`` (a :class:`DeviceSkips` or
    :class:`HostSkips`) has seen into the run's total, reports new skips,
    and raises FloatingPointError once ``limit`` came in a row.

    Args:
        done_before: skips counted by earlier processes of the run (a resume).
    """

    def __init__(self, counts: Union[DeviceSkips, HostSkips], limit: int, done_before: int = 0):
        self.counts, self.limit = counts, limit
        self._base = self.total = done_before

    def update(self, step: int, stop: bool = True) -> int:
        """The run's total after folding in the new skips (logged); with
        ``stop``, raise after ``limit`` in a row. Reading device counts waits
        for the device: call where the host waits anyway (log steps, saves)."""
        skipped, longest = self.counts.read()
        new = self._base + skipped - self.total
        if new > 0:
            self.total += new
            log.warning("non-finite loss or gradient: %d %s skipped by step %d (%d in all)", new,
                        self.counts.unit, step, self.total)
        if stop and longest >= self.limit:
            raise FloatingPointError(
                f"{longest} non-finite losses in a row {'at' if self.counts.exact else 'by'} step {step}: "
                "stopping. Lower optim.lr, check the data (data.on_error) or use train.precision=fp32")
        return self.total
