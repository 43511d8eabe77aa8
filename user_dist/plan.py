"""How a run's batch is laid out over ranks and micro-steps.

One place computes the global batch; the DeepSpeed config, the checkpoint's
meta, the resume checks, the throughput log and the steps per epoch read it
from here.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig


@dataclass(frozen=True)
class BatchLayout:
    """A global batch of ``world_size x per_rank x grad_accum`` pairs per optimiser step."""

    world_size: int
    per_rank: int  # pairs per rank per micro-step (train.batch_size)
    grad_accum: int  # micro-steps per optimiser step (train.grad_accum)

    @classmethod
    def of(cls, train: TrainConfig, world_size: int) -> "BatchLayout":
        return cls(world_size, train.batch_size, train.grad_accum)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_rank * self.grad_accum

    def describe(self) -> str:
        """'2 ranks x train.batch_size 8 x train.grad_accum 3 = 48', for messages."""
        return (f"{self.world_size} ranks x train.batch_size {self.per_rank} x train.grad_accum "
                f"{self.grad_accum} = {self.global_batch}")
