"""What a recipe means on a given number of ranks: the run plan.

A config states its recipe globally (``train.global_batch_size``,
``queue.global_size``) or per rank (``train.batch_size``,
``queue.size_per_rank``: then the batch and the pool grow with the ranks).
:class:`RunPlan` derives, for one world size, what every rank runs: its batch
and queue slots, the learning rate and momentum after the scaling rules, the
warmup, the pool's age in steps and the steps per epoch. :meth:`RunPlan.resolve`
folds it into the per-rank config the job runs; ``launch/train.py
--print-plan --world-size N`` shows it without data or a GPU, and a job logs it
at start.

Scaling rules, all relative to ``optim.reference_batch`` (B_ref, the paper's
128) for a global batch B:

- ``optim.scale_rule``: lr x B/B_ref (linear), x sqrt(B/B_ref) (sqrt), or as
  given (none). A raised lr gets a linear warmup of one epoch unless
  ``optim.warmup_steps`` is set.
- ``queue.momentum_rule=horizon``: m_eff = m^(B/B_ref). The EMA forgets a
  factor m per step, i.e. per B samples; m^(B/B_ref) forgets the same per
  sample, so the key towers average over the same number of samples.
- ``queue.size_rule``: the pool in samples (``samples``: global_size keys at
  any B; its age in steps shrinks as B grows) or in steps (``steps``:
  global_size x B/B_ref keys, as many steps' keys as at B_ref).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .config import Config, ConfigError, TrainConfig


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


def _multiples_near(n: int, unit: int) -> str:
    """The multiples of ``unit`` next to ``n``, for an error message."""
    lo = max(unit, n // unit * unit)
    return f"{lo} or {lo + unit}" if lo != n else str(n)


@dataclass(frozen=True)
class RunPlan:
    """What a job of ``world_size`` ranks runs for a config's recipe.

    Build with :meth:`make`; ``steps_per_epoch`` and ``total_steps`` are None
    when the number of training pairs is not known (no data at hand).
    """

    world_size: int
    per_rank_batch: int  # pairs per rank per micro-step
    grad_accum: int
    global_batch: int  # pairs per optimiser step, all ranks
    per_rank_queue: int  # queue slots per rank per modality (a replicated queue holds global_pool)
    global_pool: int  # keys in the pool per modality
    reference_batch: int
    lr_scale: float  # optim.lr x lr_scale = lr
    lr: float  # AdamW's peak lr (the text tower's: x model.text.lr_mult)
    text_lr: float
    momentum: float  # m of the key towers, after queue.momentum_rule
    warmup_steps: int
    pool_age_steps: float  # optimiser steps whose keys fill the pool
    steps_per_epoch: Optional[int]
    total_steps: Optional[int]
    batch_grows: bool  # stated per rank: the global batch grows with the ranks
    pool_grows: bool  # stated per rank: the pool grows with the ranks
    notes: tuple = ()

    @classmethod
    def make(cls, cfg: Config, world_size: int, train_pairs: Optional[int] = None) -> "RunPlan":
        """The plan of ``cfg`` on ``world_size`` ranks; ``train_pairs``: the
        (image, caption) pairs of one epoch, when known.

        Raises:
            ConfigError: a global size that does not divide over the ranks,
                or a queue smaller than a rank's batch; naming the key and
                the values that would work.
        """
        t, q, o = cfg.train, cfg.queue, cfg.optim
        notes: List[str] = []
        if t.global_batch_size:
            per_micro = world_size * t.grad_accum
            if t.global_batch_size % per_micro:
                raise ConfigError(
                    f"train.global_batch_size ({t.global_batch_size}) does not divide over {world_size} ranks x "
                    f"train.grad_accum {t.grad_accum} = {per_micro} micro-batches; use "
                    f"{_multiples_near(t.global_batch_size, per_micro)} (or another train.grad_accum)")
            per_rank = t.global_batch_size // per_micro
        else:
            per_rank = t.batch_size
        global_batch = per_rank * world_size * t.grad_accum
        ratio = global_batch / o.reference_batch

        if q.size_rule == "steps" and not q.global_size:
            raise ConfigError("queue.size_rule=steps scales queue.global_size, which is 0: set queue.global_size "
                              "(the pool at optim.reference_batch)")
        if q.global_size:
            wanted = q.global_size * (ratio if q.size_rule == "steps" else 1.0)
            # Whole slots on every rank: round up to a multiple of the ranks.
            pool = int(math.ceil(wanted / world_size - 1e-9)) * world_size
            if q.size_rule == "samples" and pool != q.global_size:
                raise ConfigError(
                    f"queue.global_size ({q.global_size}) does not divide over {world_size} ranks; use "
                    f"{_multiples_near(q.global_size, world_size)}")
            per_rank_queue = pool // world_size
        else:
            per_rank_queue, pool = q.size_per_rank, q.size_per_rank * world_size
        if cfg.loss.queue_weight > 0 and per_rank_queue < per_rank:
            raise ConfigError(
                f"the pool of {pool} keys gives each of {world_size} ranks {per_rank_queue} slots, fewer than its "
                f"batch of {per_rank}: a queue smaller than a batch would drop keys it has just enqueued. Raise "
                f"queue.global_size to at least {per_rank * world_size}, or use queue.size_rule=steps")

        lr_scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[o.scale_rule]
        lr = o.lr * lr_scale
        momentum = q.momentum ** ratio if q.momentum_rule == "horizon" else q.momentum
        steps_per_epoch = None
        if train_pairs is not None:
            steps_per_epoch = train_pairs // (world_size * per_rank) // t.grad_accum
        warmup = o.warmup_steps
        if not warmup and lr_scale > 1.0:
            warmup = steps_per_epoch or 0
            notes.append(f"the lr is raised x{lr_scale:.3g}: a linear warmup of one epoch"
                         f"{'' if steps_per_epoch else ' (its steps are known once the data is)'}")
        if o.scale_rule == "none" and abs(ratio - 1.0) > 1e-9:
            notes.append(f"the global batch is {ratio:.3g}x optim.reference_batch and the lr is not scaled "
                         "(optim.scale_rule=none)")
        if not t.global_batch_size and world_size > 1:
            notes.append("train.batch_size is per rank: the global batch grows with the ranks "
                         "(set train.global_batch_size to fix it)")
        if not q.global_size and world_size > 1:
            notes.append("queue.size_per_rank is per rank: the pool grows with the ranks "
                         "(set queue.global_size to fix it)")
        total = None
        if steps_per_epoch is not None:
            total = steps_per_epoch * t.epochs
            if t.max_steps:
                total = min(total, t.max_steps)
        return cls(world_size=world_size, per_rank_batch=per_rank, grad_accum=t.grad_accum,
                   global_batch=global_batch, per_rank_queue=per_rank_queue, global_pool=pool,
                   reference_batch=o.reference_batch, lr_scale=lr_scale, lr=lr,
                   text_lr=lr * cfg.model.text.lr_mult, momentum=momentum, warmup_steps=warmup,
                   pool_age_steps=pool / global_batch, steps_per_epoch=steps_per_epoch, total_steps=total,
                   batch_grows=not t.global_batch_size, pool_grows=not q.global_size, notes=tuple(notes))

    def resolve(self, cfg: Config) -> Config:
        """The per-rank config a job of this plan runs: per-rank sizes, the
        scaled lr and momentum, the warmup; the global keys and the rules
        are folded in (so resolving it again changes nothing)."""
        t, q, o = cfg.train, cfg.queue, cfg.optim
        return dataclasses.replace(
            cfg,
            train=dataclasses.replace(t, batch_size=self.per_rank_batch, global_batch_size=0),
            queue=dataclasses.replace(q, size_per_rank=self.per_rank_queue, global_size=0, size_rule="samples",
                                      momentum=self.momentum, momentum_rule="none"),
            optim=dataclasses.replace(o, lr=self.lr, scale_rule="none", warmup_steps=self.warmup_steps))

    def as_dict(self) -> Dict[str, Any]:
        """The plan as JSON-able values (``--print-plan --json``)."""
        out = dataclasses.asdict(self)
        out["notes"] = list(self.notes)
        return out

    def table(self) -> str:
        """The plan as an aligned two-column table, for people."""
        def maybe(v: Optional[int]) -> str:
            return "unknown (no data at hand)" if v is None else f"{v:,}"

        rows = [
            ("ranks", f"{self.world_size}"),
            ("batch per rank", f"{self.per_rank_batch} x grad_accum {self.grad_accum}"),
            ("global batch", f"{self.global_batch:,}" + (" (grows with the ranks)" if self.batch_grows else "")),
            ("queue slots per rank", f"{self.per_rank_queue:,}"),
            ("global pool", f"{self.global_pool:,}" + (" (grows with the ranks)" if self.pool_grows else "")),
            ("pool age", f"{self.pool_age_steps:.3g} steps"),
            ("lr", f"{self.lr:.4g} (x{self.lr_scale:.3g}; text tower {self.text_lr:.4g})"),
            ("momentum", f"{self.momentum:.6g}"),
            ("warmup", f"{self.warmup_steps:,} steps"),
            ("steps per epoch", maybe(self.steps_per_epoch)),
            ("steps in total", maybe(self.total_steps)),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
