"""The training loop: epochs of optimiser steps, logs, checkpoints, validation.

One pass of :meth:`Trainer.fit`, epoch by epoch:

    for each micro-batch of the epoch's stream (user_dist.data.train_loader):
        stats = step.micro_step(batch)         user_dist.train_step.TrainStep
          (train.accum_mode=cached: for each window of grad_accum micro-batches,
           stats = step.cached_step(window); a window cut short by the
           epoch's end is left out)
        a micro-batch (cached: a window) dropped for a non-finite loss: count it, go on
        at the end of an accumulation window (one optimiser step):
            log (and count device-side skips) every train.log_every steps;
            stop on SIGTERM/SIGUSR1 (checkpoint first)
            checkpoint every train.ckpt_every_steps
    at the epoch's end: validate, checkpoint

What a step is lives in TrainStep; where a resume starts in
user_dist.resume; what a checkpoint holds in user_dist.checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import distributed as du
from .checkpoint import CheckpointMeta
from .config import Config, ConfigError, to_yaml
from .deepspeed_config import resolve, zero_stage
from .faults import Faults
from .monitor import Monitor, to_host
from .nonfinite import SkipPolicy
from .plan import BatchLayout
from . import rng
from .resume import ResumePlan, restore
from .train_step import TrainStep

log = logging.getLogger("user_dist")

@dataclass
class Position:
    """Where the run is: optimiser steps done, epoch, steps done in that epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_nonfinite: int = 0


class StopRequested(Exception):
    pass


class _Signals:
    """SIGTERM / SIGUSR1 (SLURM preemption): checkpoint at the next log step, exit 0.
    (Every rank must agree to stop: the flag is all-reduced at log steps only.)"""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("received signal %d: will checkpoint at the next log step and exit", signum)
        self.flag = True


class StepWindow:
    """The micro-batches of one optimiser step (an accumulation window), and
    the host's wall time of the whole step: the sum of its micro-steps
    (dropped ones included), without the waits for data between them."""

    def __init__(self, size: int, clock: Callable[[], float] = time.perf_counter):
        self.size, self.clock = size, clock
        self.done = 0  # micro-batches counted in the open window
        self.open_seconds = 0.0  # time of the open window's micro-steps so far
        self.seconds = 0.0  # of the last complete window

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Around one micro-step: its time counts towards the open window."""
        start = self.clock()
        try:
            yield
        finally:
            self.open_seconds += self.clock() - start

    def complete(self, micro_batches: int = 1) -> bool:
        """Micro-batches counted; True when they closed the window (then ``seconds`` is set)."""
        self.done += micro_batches
        if self.done < self.size:
            return False
        self.seconds, self.open_seconds, self.done = self.open_seconds, 0.0, 0
        return True


def _windows(stream: Iterable[Dict[str, Any]], size: int) -> Iterator[List[Dict[str, Any]]]:
    """The micro-batches of ``stream`` in accumulation windows of ``size``
    (cached accumulation). A stream that ends inside a window (micro-batches
    dropped for non-finite losses, or the epoch's trailing ones) leaves that
    window out: a step starts and ends within one epoch, so a checkpoint at
    the epoch's end lies on an optimiser-step boundary."""
    window: List[Dict[str, Any]] = []
    for batch in stream:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []


class Trainer:
    """A training job on this process's rank: its data, step, position and outputs.

    Args:
        run_dir: the run folder (checkpoints, logs, TensorBoard).
        resume_from: a complete checkpoint to continue, or ''.
        faults: test hooks (user_dist.faults); none by default.
    Raises:
        ConfigError: the data or a checkpoint does not fit this job (before
            anything is written).
    """

    def __init__(self, cfg: Config, run_dir: str, resume_from: str = "", faults: Optional[Faults] = None):
        from .data import train_loader
        from .tokenizer import build_tokenizer

        self.cfg, self.run_dir = cfg, run_dir
        self._train_loader = train_loader
        self.rank, self.world = du.rank(), du.world_size()
        self.faults = faults or Faults()
        t = cfg.train
        self.layout = BatchLayout.of(t, self.world)
        self.tokenizer = build_tokenizer(cfg.model.text)
        first = self._stream(0)
        if du.is_main():
            from .data import describe_data

            for line in describe_data(cfg.data, validation=t.validate_every_epochs > 0):
                log.info("data: %s", line)
        self.data_fingerprint = first.fingerprint
        # Micro-batches per epoch are equal on every rank; an optimiser step is grad_accum of them.
        self.steps_per_epoch = first.steps_per_epoch // t.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{cfg.data.train_shards}: one epoch holds fewer pairs than one global batch "
                              f"({self.layout.describe()}); lower train.batch_size")
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)

        ds_cfg = resolve(cfg, self.world)
        plan = ResumePlan.make(resume_from, cfg, self.layout, zero_stage(ds_cfg)) if resume_from else None
        self.train_step = TrainStep(cfg, self.steps_per_epoch, self.total_steps, ds_config=ds_cfg,
                              load_universal=bool(plan and plan.universal), faults=self.faults)
        if self.train_step.cached and du.is_main():
            log.info("cached accumulation: the in-batch negatives of each optimiser step are all %d pairs of its "
                     "%d micro-batches per rank (one extra forward per micro-batch)", self.layout.global_batch,
                     t.grad_accum)
        self.pos = Position()
        self.best_rsum, self.best_tag = float("-inf"), ""
        if plan is not None:
            restore(plan, self.train_step, t, self.data_fingerprint)
            m = plan.saved
            self.pos = Position(m.step, m.epoch, m.step_in_epoch, m.skipped_nonfinite)
            self.best_rsum = m.best_rsum if m.best_rsum is not None else float("-inf")
            self.best_tag = m.best_tag
        else:
            rng.seed_rank(t.seed, self.rank)  # a resume restores the saved RNG states instead
        self.skip_policy = SkipPolicy(self.train_step.skips, t.max_nonfinite_in_a_row, done_before=self.pos.skipped_nonfinite)
        self.monitor = Monitor(run_dir, du.is_main(), self.total_steps)
        self.monitor.text("config", "```\n" + to_yaml(cfg) + "\n```")
        self.signals = _Signals()
        self._last_log = (time.time(), self.pos.step)
        # One window for the whole run: a window left open when an epoch's
        # stream ran dry (dropped micro-batches) closes in the next epoch, as
        # DeepSpeed's own count of micro-steps does.
        self.window = StepWindow(t.grad_accum)

    def _stream(self, epoch: int, start_step: int = 0):
        t = self.cfg.train
        return self._train_loader(self.cfg.data, self.tokenizer, t.batch_size, rank=self.rank,
                                  world_size=self.world, epoch=epoch, seed=t.seed, start_step=start_step)

    # ----------------------------------------------------------------- the loop

    def fit(self) -> Position:
        """Train until train.epochs or train.max_steps; checkpoint on the way
        and at the end. A stop signal checkpoints and returns early."""
        t = self.cfg.train
        try:
            while self.pos.epoch < t.epochs and self.pos.step < self.total_steps:
                if self._train_epoch():
                    self._end_epoch()
                elif not self._saved_at(self.pos.step):
                    self.save()  # train.max_steps reached inside an epoch
        except StopRequested:
            log.warning("stop requested: saving a checkpoint at step %d and exiting", self.pos.step)
            self.save()
        finally:
            self.monitor.flush()
        return self.pos

    def _train_epoch(self) -> bool:
        """Optimiser steps over the rest of this epoch's stream; True when the
        epoch is complete (False: train.max_steps came first)."""
        pos, accum, window, step = self.pos, self.cfg.train.grad_accum, self.window, self.train_step
        stream = self._stream(pos.epoch, start_step=pos.step_in_epoch * accum)
        # Cached accumulation takes a whole window at once; plain, one micro-batch at a time.
        units = _windows(stream, accum) if step.cached else ([batch] for batch in stream)
        for unit in units:
            if pos.step_in_epoch >= self.steps_per_epoch:
                break  # the trailing micro-batches of an incomplete accumulation window
            with window.timed():
                grad_norm = self._logs_at(pos.step + 1)
                stats = (step.cached_step(unit, pos.step, grad_norm=grad_norm) if step.cached
                         else step.micro_step(unit[0], pos.step, grad_norm=grad_norm))
            if stats is None:  # dropped on every rank for a non-finite loss; its place is taken by the next
                self._count_skips()
                continue
            if not window.complete(len(unit)):
                continue
            pos.step += 1
            pos.step_in_epoch += 1
            self._after_step(stats, window.seconds)
            if pos.step >= self.total_steps:
                return pos.step_in_epoch >= self.steps_per_epoch
        # An epoch also ends when its stream runs dry early (micro-batches
        # dropped for non-finite losses), never by restarting the stream.
        return True

    def _after_step(self, stats: Dict[str, torch.Tensor], step_seconds: float) -> None:
        step = self.pos.step
        if self._logs_at(step):
            self._count_skips()  # device-side counts: the host waits here anyway
            self._log(stats, step_seconds)
            if self._stop_requested():
                raise StopRequested()
        if self._saved_at(step):
            self.save()
        self.faults.after_step(step, self.rank)

    def _end_epoch(self) -> None:
        t = self.cfg.train
        self.pos.epoch += 1
        self.pos.step_in_epoch = 0
        if t.validate_every_epochs and self.pos.epoch % t.validate_every_epochs == 0:
            self.validate()
        self.save()

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.total_steps

    def _saved_at(self, step: int) -> bool:
        """Whether train.ckpt_every_steps saves at this step."""
        every = self.cfg.train.ckpt_every_steps
        return bool(every) and step % every == 0

    def _count_skips(self, stop: bool = True) -> None:
        self.pos.skipped_nonfinite = self.skip_policy.update(self.pos.step, stop=stop)

    def _stop_requested(self) -> bool:
        return bool(du.agree([self.signals.flag], "any"))

    def _log(self, stats: Dict[str, torch.Tensor], step_seconds: float) -> None:
        last_time, last_step = self._last_log
        now = time.time()
        values = {f"train/{k}": v for k, v in to_host(stats).items()}
        values.update({
            "perf/samples_per_s": (self.pos.step - last_step) * self.layout.global_batch / max(1e-9, now - last_time),
            "perf/step_time_s": step_seconds,
            "train/epoch": float(self.pos.epoch),
            "train/skipped_nonfinite": float(self.pos.skipped_nonfinite),
            "queue/pool_size": float(self.train_step.queue.pool_size),
        })
        ds_norm = self.train_step.deepspeed_grad_norm()  # ZeRO 1-2 keep it
        if "train/grad_norm" not in values and ds_norm is not None:
            values["train/grad_norm"] = ds_norm
        for i, lr in enumerate(self.train_step.learning_rates()):
            values[f"lr/group{i}"] = lr
        self.monitor.scalars(values, self.pos.step)
        self.monitor.progress(self.pos.step, self.pos.epoch, values)
        self._last_log = (time.time(), self.pos.step)

    # ----------------------------------------------------------------- checkpoints

    def save(self) -> str:
        self._count_skips(stop=False)
        p, layout = self.pos, self.layout
        meta = CheckpointMeta(
            step=p.step, epoch=p.epoch, step_in_epoch=p.step_in_epoch, world_size=layout.world_size,
            global_batch=layout.global_batch, zero_stage=self.train_step.zero_stage,
            queue_size_per_rank=self.train_step.queue.size_per_rank, queue_mode=self.train_step.queue.mode,
            skipped_nonfinite=p.skipped_nonfinite, samples=p.step * layout.global_batch,
            best_rsum=self.best_rsum if self.best_rsum > float("-inf") else None, best_tag=self.best_tag,
            data_fingerprint=self.data_fingerprint)
        momentum_state, rank_state = self.train_step.checkpoint_state()
        path = ckpt.save_checkpoint(
            self.run_dir, self.train_step.engine, meta=meta, config_yaml=to_yaml(self.cfg), momentum_state=momentum_state,
            rank_state=rank_state, keep_last=self.cfg.train.keep_last,
            keep_tags=(self.best_tag,) if self.best_tag else ())
        if du.is_main() and self.best_tag == os.path.basename(path):
            try:
                ckpt.write_pointer(os.path.join(self.run_dir, "checkpoints", "best"), self.best_tag)
            except OSError as exc:  # the checkpoint itself is complete; meta.json names the best too
                log.error("could not point checkpoints/best at %s: %s", self.best_tag, exc)
        log.info("saved checkpoint %s", path)
        return path

    # ----------------------------------------------------------------- validation

    def validate(self) -> Optional[float]:
        """rsum on the val split (generic protocol: any number of captions per image) of the
        train.validate_towers (online or momentum); keeps the best checkpoint by it."""
        from .data import eval_loader
        from .evaluation.encode import encode_split
        from .evaluation.metrics import evaluate

        momentum = self.cfg.train.validate_towers == "momentum"
        model = self.train_step.momentum.module if momentum else self.train_step.engine.module
        was_training = model.training
        batches = eval_loader(self.cfg.data.val_shards, self.cfg.data, self.tokenizer, self.cfg.eval.batch_size,
                              rank=self.rank, world_size=self.world)
        dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32
        try:
            split = encode_split(model, batches, self.train_step.device, dtype)
        finally:
            model.train(was_training)
        rsum = None
        if du.is_main():
            m = evaluate(split.similarities().numpy(), "generic", source=self.cfg.data.val_shards,
                         caption_counts=split.caption_counts)  # any number of captions per image
            rsum = m["rsum"]
            prefix = "val/momentum" if momentum else "val"  # online: the tags from before validate_towers
            self.monitor.scalars({f"{prefix}/{k}": float(v) for k, v in m.items() if not isinstance(v, (list, dict))},
                                 self.pos.step)
            log.info("validation of the %s towers at epoch %d: rsum %.2f (i2t R@1 %.2f, t2i R@1 %.2f)",
                     self.cfg.train.validate_towers, self.pos.epoch, rsum, m["i2t_r1"], m["t2i_r1"])
        # Rank 0 scored; every rank needs the same best tag (for pruning).
        box = torch.tensor([float("nan") if rsum is None else rsum], dtype=torch.float64,
                           device=du.collective_device())
        if self.world > 1:
            dist.broadcast(box, 0)
        rsum = float(box.item())
        if rsum > self.best_rsum:
            # The checkpoint saved right after validation becomes the best one.
            self.best_rsum = rsum
            self.best_tag = ckpt.tag_for(self.pos.step)
        return rsum

    def close(self) -> None:
        self.monitor.close()
