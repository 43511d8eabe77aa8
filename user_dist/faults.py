"""Fault injection for tests: a non-finite loss or a lost rank at a known step.

The training loop never reads the environment: it is handed a :class:`Faults`
(none by default). Tests build one directly, or, for a real job
started by a launcher, set ``USER_DIST_FAULT_*`` variables that
``launch/train.py`` turns into one with :meth:`Faults.from_env`:

- ``USER_DIST_FAULT_NAN=STEP:COUNT[@RANK][,...]``: the loss of the next COUNT
  micro-batches at optimiser step STEP is made non-finite (on RANK only, if
  given), to exercise the skip-and-stop path for real (docs/training.md).
- ``USER_DIST_FAULT_KILL=STEP[@RANK]``: the rank SIGKILLs itself once
  optimiser step STEP (and its ``train.ckpt_every_steps`` checkpoint, if one
  falls there; not an epoch end's) is done: a rank lost at a known point, for
  the launchers' fail-fast and resume tests (docs/multinode.md). Without
  @RANK: every rank.
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional

import torch

log = logging.getLogger("user_dist")


@dataclass
class Faults:
    """What to break, for one rank.

    Args:
        nan: optimiser step -> how many of its micro-batches get a NaN loss.
        kill_after_step: SIGKILL this process after this optimiser step.
    """

    nan: Dict[int, int] = field(default_factory=dict)
    kill_after_step: Optional[int] = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], rank: int) -> "Faults":
        """The faults that ``USER_DIST_FAULT_NAN`` / ``USER_DIST_FAULT_KILL`` ask of ``rank``."""
        nan: Dict[int, int] = {}
        for item in filter(None, environ.get("USER_DIST_FAULT_NAN", "").split(",")):
            item, _, only = item.partition("@")
            step, _, count = item.partition(":")
            if not only or int(only) == rank:
                nan[int(step)] = int(count or 1)
        kill = None
        spec = environ.get("USER_DIST_FAULT_KILL", "")
        if spec:
            step, _, only = spec.partition("@")
            kill = int(step) if not only or int(only) == rank else None
        return cls(nan, kill)

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """``loss``, made NaN while step ``step`` still has poisoned micro-batches left."""
        if self.nan.get(step, 0) <= 0:
            return loss
        self.nan[step] -= 1
        return loss * float("nan")

    def after_step(self, step: int, rank: int) -> None:
        """Kill this process if it is to be lost after optimiser step ``step``."""
        if step == self.kill_after_step:
            log.warning("USER_DIST_FAULT_KILL: rank %d kills itself after step %d", rank, step)
            os.kill(os.getpid(), signal.SIGKILL)

