"""Continuing a run from a checkpoint: planned once, then carried out.

:meth:`ResumePlan.make` reads the checkpoint's meta (nothing else) before the
engine is built and decides everything a resume does:

- the same ranks, or another number of them (``reshard``); then the global
  batch must be the same (the step count, the epoch's length and the lr
  schedule keep their meaning), and ZeRO 0 continues as ZeRO 0, ZeRO 1-2 as
  ZeRO 1-2;
- whether the engine loads through DeepSpeed's universal format
  (``universal``: ZeRO 1-2 on another number of ranks), which the engine must
  know when it is built;
- whether the negative pool is laid out afresh (``queue_relayout``: other
  ranks, or another ``queue.size_per_rank`` / ``queue.mode``).

:func:`restore` then loads the engine, the key towers, the queue and the RNG
states into a :class:`~user_dist.train_step.TrainStep` as planned.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional

from . import checkpoint as ckpt
from . import distributed as du
from . import rng
from .checkpoint import CheckpointMeta
from .config import Config, ConfigError, TrainConfig
from .plan import BatchLayout

log = logging.getLogger("user_dist")


@dataclass(frozen=True)
class ResumePlan:
    """What resuming ``path`` in this job loads and changes."""

    path: str
    saved: CheckpointMeta  # how the run stood and was laid out when it saved
    layout: BatchLayout  # this job's
    zero_stage: int  # this job's, in force
    queue_size_per_rank: int  # this job's
    queue_mode: str  # this job's

    @property
    def reshard(self) -> bool:
        """Another number of ranks than the one that saved."""
        return self.saved.world_size != self.layout.world_size

    @property
    def universal(self) -> bool:
        """The engine loads through DeepSpeed's universal format."""
        return self.reshard and self.zero_stage > 0

    @property
    def queue_relayout(self) -> bool:
        """The saved pool is laid out afresh on this job's ring."""
        return self.reshard or (self.saved.queue_size_per_rank, self.saved.queue_mode) != (
            self.queue_size_per_rank, self.queue_mode)

    @classmethod
    def make(cls, path: str, cfg: Config, layout: BatchLayout, zero_stage: int) -> "ResumePlan":
        """Plan the resume of ``path`` (a complete checkpoint) by this job.

        Raises:
            FileNotFoundError: ``path`` is not a complete checkpoint.
            ConfigError: it cannot continue on this job's ranks, saying what to set.
        """
        ckpt.require_complete(path)
        plan = cls(path, CheckpointMeta.read(path), layout, zero_stage, cfg.queue.size_per_rank, cfg.queue.mode)
        if plan.reshard:
            plan._check_reshard()
        return plan

    def _check_reshard(self) -> None:
        saved, mine = self.saved, self.layout
        if saved.global_batch != mine.global_batch:
            hint = ""
            per_rank, rem = divmod(saved.global_batch, mine.world_size * mine.grad_accum)
            if per_rank > 0 and rem == 0:
                hint = f" (here: train.batch_size={per_rank})"
            raise ConfigError(
                f"{self.path} was written by {saved.world_size} ranks with a global batch of {saved.global_batch}; "
                f"this job has {mine.describe()}. To resume on another number of ranks keep the global batch: set "
                f"train.batch_size and train.grad_accum so that ranks x batch_size x grad_accum = "
                f"{saved.global_batch}{hint}")
        if (saved.zero_stage == 0) != (self.zero_stage == 0):
            raise ConfigError(
                f"{self.path} was written by {saved.world_size} ranks with ZeRO stage {saved.zero_stage}; this "
                f"job has {mine.world_size} ranks and ZeRO stage {self.zero_stage}. On another number of ranks "
                "a ZeRO-0 run continues with ZeRO 0 and a ZeRO 1-2 run with ZeRO 1-2 (their optimiser states "
                "are laid out differently): set train.zero_stage accordingly (see docs/training.md)")


def restore(plan: ResumePlan, step, train: TrainConfig, data_fingerprint: Optional[Dict[str, Any]]) -> None:
    """Load ``plan.path`` into ``step`` (a TrainStep built with
    ``load_universal=plan.universal``) as planned; seed or restore the RNGs
    (``train.seed``; ``train.trust_checkpoint`` skips the unpickling check).
    Collective. Where the run continues is ``plan.saved``."""
    rank = du.rank()
    saved = plan.saved
    step.momentum.load_state_dict(ckpt.load_checkpoint(plan.path, step.engine, universal=plan.universal,
                                                        trusted=train.trust_checkpoint))
    own = None if plan.reshard else ckpt.load_rank_state(plan.path, rank)
    if plan.queue_relayout:
        step.queue.redistribute(ckpt.load_queue_states(plan.path, saved.world_size))
    else:
        step.queue.load_state_dict(own["queue"])
    if plan.reshard:
        # New ranks, new streams: per-rank dropout noise seeded afresh (and
        # apart from this run's start), the queue laid out on the new ranks,
        # rank 0's BatchNorm statistics on every rank (engine, key towers).
        rng.seed_rank(train.seed, rank, salt=saved.step)
        log.warning("resuming %s, written by %d ranks, on %d: the global batch (%d) and the LR schedule "
                    "carry over; the negative pool is %d slots (was %d), %d entries kept, the newest; "
                    "the data of the interrupted epoch is split afresh between the ranks",
                    plan.path, saved.world_size, plan.layout.world_size, saved.global_batch, step.queue.pool_size,
                    saved.world_size * saved.queue_size_per_rank, step.queue.fill)
    else:
        # The engine and the key towers gave every rank rank 0's buffers: each
        # takes back its own BatchNorm statistics (TrainStep.checkpoint_state).
        if "buffers" in own:
            step.load_rank_buffers(own["buffers"])
        elif saved.world_size > 1:
            log.warning("%s holds no per-rank buffers (written by an older version): every rank continues "
                        "with rank 0's BatchNorm statistics, if the model has any", plan.path)
        rng.restore(own["rng"])
        if plan.queue_relayout:
            log.warning("resuming %s with queue.size_per_rank %d (was %d), queue.mode %s (was %s): the negative "
                        "pool is laid out afresh, the newest entries kept", plan.path, plan.queue_size_per_rank,
                        saved.queue_size_per_rank, plan.queue_mode, saved.queue_mode)
    changed = _changed_stream(saved.data_fingerprint, data_fingerprint, plan.reshard)
    if changed:
        log.warning("resuming %s with a different data stream (%s changed): the run continues, but not "
                    "exactly where it stopped", plan.path, ", ".join(changed))
    log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", plan.path, saved.step, saved.epoch,
             saved.step_in_epoch)


def _changed_stream(saved: Optional[Dict[str, Any]], now: Optional[Dict[str, Any]], reshard: bool) -> list:
    """The data-stream parameters that differ (none when the checkpoint recorded none)."""
    if saved is None or now is None:
        return []
    # A reshard changes the ranks and their batch size by design (reported above).
    expected = {"world_size", "batch_size"} if reshard else set()
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in expected)
