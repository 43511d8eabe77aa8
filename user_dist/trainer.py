"""The training loop: DeepSpeed engine, momentum towers, queues, UTO, checkpoints.

One optimiser step (``train.grad_accum`` micro-steps):

    img, txt = engine(batch)                      # online towers, (B, E), grad
    img_k, txt_k = momentum.encode(batch)         # key towers, fp32, no grad
    loss = uto_loss(img, txt, img_k, txt_k, ids, queue)
    engine.backward(loss); engine.step()
    at the accumulation boundary: momentum.update(online towers)
    queue.enqueue(img_k, txt_k, ids)              # every micro-step, after the loss

Gradient accumulation: keys of every micro-batch are enqueued (the queue sees
every sample once per epoch, as without accumulation), while the momentum
towers move once per optimiser step, since theta_q only changes then.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import distributed as du
from .config import Config, ConfigError, to_yaml
from .deepspeed_config import derive, step_owns_optimizer, take_clipping, with_user_override
from .monitor import Monitor, to_host
from .nonfinite import DeviceSkips
from .schedule import build_scheduler

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
    """SIGTERM / SIGUSR1 (SLURM preemption): checkpoint at the next step, exit 0."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("received signal %d: will checkpoint at the next step boundary and exit", signum)
        self.flag = True


def _float_inputs_to(batch: Dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """Move a batch to the device; floating inputs take the engine's dtype."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _parse_fault(spec: str, rank: int) -> Dict[int, int]:
    """``USER_DIST_FAULT_NAN=STEP:COUNT[@RANK][,...]``: a test hook that makes the
    loss of the next COUNT micro-batches at optimiser step STEP non-finite (on
    RANK only, if given), to exercise the skip-and-stop path for real
    (docs/training.md)."""
    out: Dict[int, int] = {}
    for item in filter(None, spec.split(",")):
        item, _, only = item.partition("@")
        step, _, count = item.partition(":")
        if not only or int(only) == rank:
            out[int(step)] = int(count or 1)
    return out


def _parse_fault_kill(spec: str, rank: int) -> Optional[int]:
    """``USER_DIST_FAULT_KILL=STEP@RANK``: a test hook that makes rank RANK
    SIGKILL itself once optimiser step STEP (and its train.ckpt_every_steps
    checkpoint, if one falls there; not an epoch end's) is done; a rank lost
    at a known point, for the launchers' fail-fast and resume tests
    (docs/multinode.md). Without @RANK: every rank. None: not this rank."""
    if not spec:
        return None
    step, _, only = spec.partition("@")
    return int(step) if not only or int(only) == rank else None


class TrainStep:
    """The objects of one training step and the micro-step itself: DeepSpeed
    engine around the online towers, fp32 key towers, queues, UTO.

    Needs no data stream, run folder or monitor, so that launch/benchmark.py
    runs exactly the step that launch/train.py runs.

    Args:
        steps_per_epoch, total_steps: optimiser steps, for the lr schedule.
    """

    def __init__(self, cfg: Config, steps_per_epoch: int, total_steps: int, load_universal: bool = False):
        import deepspeed

        from .loss import compiled_uto_terms, uto_loss
        from .models import build_model
        from .momentum import MomentumTowers
        from .queue import NegativeQueues

        t, o = cfg.train, cfg.optim
        self.cfg, self.world = cfg, du.world_size()
        self._uto_loss = uto_loss
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        # Same seed on every rank: identical initial towers (DeepSpeed broadcasts
        # parameters, not buffers) and identical momentum copies.
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, cfg.data.mode)
        du.broadcast_module_state(model)
        # The key towers are copied in fp32 before DeepSpeed wraps the module.
        self.momentum = MomentumTowers(model, cfg.queue)
        ds_cfg, diff = with_user_override(derive(cfg, self.world), t.deepspeed_config)
        for line in diff:
            log.warning("deepspeed_config override: %s", line)
        if ds_cfg.get("fp16", {}).get("enabled"):
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():  # else a ValueError from deep inside DeepSpeed
                raise ConfigError(
                    f"train.precision=fp16, but DeepSpeed's {get_accelerator().device_name()} accelerator reports "
                    "no fp16 support here (most CPUs; GPUs before compute capability 7.0). Use "
                    "train.precision=bf16 where the device has it, or fp32")
        # A ZeRO 1-2 checkpoint of another world size (Trainer._restore), into a
        # ZeRO 1-2 engine; a ZeRO-0 one is refused there with a message.
        self.load_universal = load_universal and ds_cfg.get("zero_optimization", {}).get("stage", 0) > 0
        if self.load_universal:
            ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
        # Without ZeRO and fp16 the optimiser step is ours: non-finite steps are
        # skipped on the device (user_dist.nonfinite), which needs the fused
        # AdamW's found_inf (CUDA and CPU). Elsewhere DeepSpeed wraps the
        # optimiser and the loss is checked on the host.
        device_skips = step_owns_optimizer(ds_cfg)
        fused = torch.cuda.is_available() or device_skips
        optimizer = torch.optim.AdamW(model.param_groups(o), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay, fused=fused or None)
        scheduler = build_scheduler(optimizer, o, steps_per_epoch, total_steps)
        self._clip = take_clipping(ds_cfg)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
        self.device = self.engine.device
        self.skips = DeviceSkips(self.device, self.world) if device_skips else None
        if self.skips is not None:
            optimizer.found_inf = self.skips.found_inf  # read by the fused AdamW at every step, as GradScaler sets it
        self.zero_stage = zero = self.engine.zero_optimization_stage()  # the stage in force, after any user override
        if self.world == 1 and zero == 0:
            # One rank: DeepSpeed's gradient "all-reduce" would flatten every
            # gradient into a bucket and copy it back, for nothing.
            self.engine.enable_backward_allreduce = False
        self._params = [p for p in self.engine.module.parameters() if p.requires_grad]
        # Input dtype: the module's (fp16 casts it; bf16 runs fp32 weights under autocast).
        self.dtype = next(self.engine.module.parameters()).dtype
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
        self.momentum.to(self.device)
        if self.device.type == "cuda":
            # cuDNN wants each RNN's weights in one flat buffer; deep copies and
            # device moves leave them apart, and every call then compacts them
            # (a copy and a warning per GRU call). Done before anything (the
            # optimiser's state, the momentum pairs) holds their storage. ZeRO
            # 1-2 own the parameters' storage in their flat partitions: leave it.
            for module in ([self.engine.module] if zero == 0 else []) + [self.momentum.module]:
                for m in module.modules():
                    if isinstance(m, torch.nn.RNNBase):
                        m.flatten_parameters()
        if t.compile != "none":
            # In place: parameter names, and so checkpoints, stay as they are.
            self.engine.module.compile_towers(t.compile)
            self.momentum.module.compile_towers(t.compile)
            # The loss too: its ~150 small kernels (forward and backward) become
            # two graphs (a pool sharded over ranks stays eager: collectives).
            self._uto_loss = functools.partial(uto_loss, terms=compiled_uto_terms(t.compile))
        self.queue = NegativeQueues(cfg.queue, cfg.model.embed_size, self.device)
        self._fault_nan = _parse_fault(os.environ.get("USER_DIST_FAULT_NAN", ""), du.rank())

    def micro_step(self, batch: Dict[str, Any], step: int = 0,
                   grad_norm: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        """Forward + backward of one micro-batch at optimiser step ``step``.

        Returns the loss statistics (with ``grad_norm``, the global gradient
        norm before clipping, as a tensor). A non-finite loss: with
        ``self.skips`` the step is skipped on the device and the statistics
        are returned as usual (the loss among them, non-finite); without, the
        loss is checked on the host and None is returned (then no rank stepped).
        """
        if self.cfg.train.compile == "reduce-overhead":
            # CUDA graph trees: a new step begins here, so the graphs' outputs of
            # the last step (all consumed by now) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        b32 = _float_inputs_to(batch, self.device, torch.float32)  # the key towers are fp32
        # One copy to the device; a second cast only when the module is not fp32 (fp16).
        b = b32 if self.dtype == torch.float32 else _float_inputs_to(b32, self.device, self.dtype)
        img, txt = self.engine(b)
        with torch.no_grad(), self.autocast:
            img_k, txt_k = self.momentum.encode(b32)
        loss, stats = self._uto_loss(img.float(), txt.float(), img_k, txt_k, b["image_ids"], self.queue,
                                     self.cfg.loss)
        if self._fault_nan.get(step, 0) > 0:  # fault injection (tests): see _parse_fault
            self._fault_nan[step] -= 1
            loss = loss * float("nan")
        keep = None
        if self.skips is not None:
            keep = self.skips.check_loss(loss)  # every rank the same, on the device
        else:
            # Every rank must agree on skipping, or collectives would mismatch.
            finite = torch.isfinite(loss.detach()).to(torch.int32)
            if self.world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not bool(finite):
                return None
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        stats = dict(stats)
        if boundary and self._clip > 0:
            # The gradients are whole and averaged over ranks here (ZeRO 0
            # all-reduces in backward): every rank computes the same norm.
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self._params, self._clip, foreach=True)
        elif grad_norm and boundary and self.zero_stage == 0:
            # Without ZeRO, DeepSpeed keeps no norm.
            grads = [p.grad for p in self._params if p.grad is not None]
            stats["grad_norm"] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if boundary and self.skips is not None:
            if "grad_norm" in stats:
                self.skips.check_norm(stats["grad_norm"])
            self.skips.before_step()
        self.engine.step()
        if boundary:
            self.momentum.update(self.engine.module)
            if self.skips is not None:
                self.skips.after_step()
        self.queue.enqueue(img_k, txt_k, b["image_ids"], keep=keep)
        stats["loss"] = loss.detach().clone()  # the loss may live in a CUDA graph's reused output memory
        return stats


class Trainer:
    def __init__(self, cfg: Config, run_dir: str, resume_from: str = ""):
        from .data import train_loader
        from .tokenizer import build_tokenizer

        self.cfg, self.run_dir = cfg, run_dir
        self._train_loader = train_loader
        self.rank, self.world = du.rank(), du.world_size()
        t = cfg.train
        self.tokenizer = build_tokenizer(cfg.model.text)
        first = self._stream(0)
        self.data_fingerprint = first.fingerprint
        # Micro-batches per epoch are equal on every rank; an optimiser step is grad_accum of them.
        self.steps_per_epoch = first.steps_per_epoch // t.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{cfg.data.train_shards}: one epoch holds fewer pairs than one global batch "
                             f"({self.world} ranks x {t.batch_size} x {t.grad_accum}); lower train.batch_size")
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)

        # A ZeRO 1-2 checkpoint of another world size loads through DeepSpeed's
        # universal format, which the engine must know of when it is built.
        saved = self._saved_layout(resume_from) if resume_from else None
        universal = bool(saved) and saved["world_size"] != self.world and saved["zero_stage"] > 0
        self.step_fn = TrainStep(cfg, self.steps_per_epoch, self.total_steps, load_universal=universal)
        self.engine, self.momentum, self.queue = self.step_fn.engine, self.step_fn.momentum, self.step_fn.queue
        self.device = self.step_fn.device

        self.pos = Position()
        self.best_rsum = float("-inf")
        self.best_tag = ""
        if resume_from:
            self._restore(resume_from, saved)
        else:
            # Per-rank seed for dropout from here on, so that ranks see
            # different noise (a resume restores the saved RNG states instead).
            torch.manual_seed(t.seed + 1000 * self.rank + 1)

        self._skips_base = self.pos.skipped_nonfinite  # the device counts from this process's start
        self.monitor = Monitor(run_dir, du.is_main(), self.total_steps)
        self.monitor.text("config", "```\n" + to_yaml(cfg) + "\n```")
        self.signals = _Signals()
        self._fault_kill = _parse_fault_kill(os.environ.get("USER_DIST_FAULT_KILL", ""), self.rank)

    # ----------------------------------------------------------------- data

    def _stream(self, epoch: int, start_step: int = 0):
        t = self.cfg.train
        return self._train_loader(self.cfg.data, self.tokenizer, t.batch_size, rank=self.rank,
                                  world_size=self.world, epoch=epoch, seed=t.seed, start_step=start_step)

    # ----------------------------------------------------------------- checkpoints

    def _reshard_check(self, path: str, saved: Dict[str, int]) -> None:
        """Whether a checkpoint of ``saved['world_size']`` ranks may continue on
        this job's: the same global batch (so the step count, the epoch's
        length and the LR schedule mean what they meant), and ZeRO 0 on both
        sides or ZeRO 1-2 on both (loaded through DeepSpeed's universal
        format). Raises ConfigError saying what to change."""
        t = self.cfg.train
        mine = self.world * t.batch_size * t.grad_accum
        if saved["global_batch"] != mine:
            hint = ""
            per_rank, rem = divmod(saved["global_batch"], self.world * t.grad_accum)
            if per_rank > 0 and rem == 0:
                hint = f" (here: train.batch_size={per_rank})"
            raise ConfigError(
                f"{path} was written by {saved['world_size']} ranks with a global batch of "
                f"{saved['global_batch']}; this job has {self.world} ranks x train.batch_size {t.batch_size} x "
                f"train.grad_accum {t.grad_accum} = {mine}. To resume on another number of ranks keep the "
                f"global batch: set train.batch_size and train.grad_accum so that ranks x batch_size x "
                f"grad_accum = {saved['global_batch']}{hint}")
        if (saved["zero_stage"] == 0) != (self.step_fn.zero_stage == 0):
            raise ConfigError(
                f"{path} was written by {saved['world_size']} ranks with ZeRO stage {saved['zero_stage']}; this "
                f"job has {self.world} ranks and ZeRO stage {self.step_fn.zero_stage}. On another number of ranks "
                "a ZeRO-0 run continues with ZeRO 0 and a ZeRO 1-2 run with ZeRO 1-2 (their optimiser states "
                "are laid out differently): set train.zero_stage accordingly (see docs/training.md)")

    @staticmethod
    def _saved_layout(path: str) -> Dict[str, int]:
        ckpt.require_complete(path)
        return ckpt.saved_layout(path, ckpt.load_meta(path))

    def _restore(self, path: str, saved: Dict[str, int]) -> None:
        reshard = saved["world_size"] != self.world
        if reshard:
            self._reshard_check(path, saved)
        state = ckpt.load_checkpoint(path, self.engine, reshard=reshard, universal=self.step_fn.load_universal,
                                     trusted=self.cfg.train.trust_checkpoint)
        self.momentum.load_state_dict(state["momentum"])
        rs = state["rank_state"]
        queue_state = rs["queue"]
        if not reshard and (queue_state["size_per_rank"], queue_state["mode"]) != (self.queue.size_per_rank,
                                                                                  self.queue.mode):
            # Same ranks, another queue.size_per_rank or queue.mode: lay the pool out afresh.
            queue_state = ckpt.load_queue_states(path, saved["world_size"])
            log.warning("resuming %s with queue.size_per_rank %d (was %d), queue.mode %s (was %s): the negative "
                        "pool is laid out afresh, the newest entries kept", path, self.queue.size_per_rank,
                        rs["queue"]["size_per_rank"], self.queue.mode, rs["queue"]["mode"])
        self.queue.load_state_dict(queue_state)
        m = state["meta"]
        if reshard:
            # New ranks, new streams: per-rank dropout noise seeded afresh (and
            # apart from this run's start), the queue laid out on the new ranks.
            torch.manual_seed(self.cfg.train.seed + 1000 * self.rank + 1 + 7919 * int(m["step"]))
            old_pool = saved["world_size"] * int(queue_state[0]["size_per_rank"])
            log.warning("resuming %s, written by %d ranks, on %d: the global batch (%d) and the LR schedule "
                        "carry over; the negative pool is %d slots (was %d), %d entries kept, the newest; "
                        "the data of the interrupted epoch is split afresh between the ranks",
                        path, saved["world_size"], self.world, saved["global_batch"], self.queue.pool_size,
                        old_pool, self.queue.fill)
        else:
            ckpt.set_rng_state(rs["rng"])
        saved_fp = m.get("data_fingerprint")
        if saved_fp is not None and saved_fp != self.data_fingerprint:
            # A reshard changes the ranks and their batch size by design (said above).
            expected = {"world_size", "batch_size"} if reshard else set()
            changed = sorted(k for k in set(saved_fp) | set(self.data_fingerprint)
                             if saved_fp.get(k) != self.data_fingerprint.get(k) and k not in expected)
        else:
            changed = []
        if changed:
            log.warning("resuming %s with a different data stream (%s changed): the run continues, but not "
                        "exactly where it stopped", path, ", ".join(changed))
        self.pos = Position(m["step"], m["epoch"], m["step_in_epoch"], m.get("skipped_nonfinite", 0))
        self.best_rsum = m.get("best_rsum") if m.get("best_rsum") is not None else float("-inf")
        self.best_tag = m.get("best_tag", "")
        log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", path, self.pos.step,
                 self.pos.epoch, self.pos.step_in_epoch)

    def save(self) -> str:
        self._count_device_skips()
        p = self.pos
        global_batch = self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world
        meta = {"epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "skipped_nonfinite": p.skipped_nonfinite,
                "samples": p.step * global_batch, "global_batch": global_batch, "zero_stage": self.step_fn.zero_stage,
                "best_rsum": self.best_rsum if self.best_rsum > float("-inf") else None,
                "best_tag": self.best_tag, "data_fingerprint": self.data_fingerprint}
        path = ckpt.save_checkpoint(
            self.run_dir, self.engine, step=p.step, meta=meta, config_yaml=to_yaml(self.cfg),
            momentum_state=self.momentum.state_dict(), rank_state={"queue": self.queue.state_dict()},
            keep_last=self.cfg.train.keep_last, keep_tags=(self.best_tag,) if self.best_tag else ())
        if du.is_main() and self.best_tag == os.path.basename(path):
            try:
                ckpt.write_pointer(os.path.join(self.run_dir, "checkpoints", "best"), self.best_tag)
            except OSError as exc:  # the checkpoint itself is complete; meta.json names the best too
                log.error("could not point checkpoints/best at %s: %s", self.best_tag, exc)
        log.info("saved checkpoint %s", path)
        return path

    # ----------------------------------------------------------------- step

    def _count_device_skips(self, stop: bool = False) -> None:
        """Fold the steps skipped on the device into the position; with
        ``stop``, end the run after train.max_nonfinite_in_a_row of them in a
        row. Waits for the device: call it where the host waits anyway."""
        if self.step_fn.skips is None:
            return
        total, longest = self.step_fn.skips.read()
        new = self._skips_base + total - self.pos.skipped_nonfinite
        if new > 0:
            self.pos.skipped_nonfinite += new
            log.warning("non-finite loss or gradient: %d optimiser step(s) skipped by step %d (%d in all)",
                        new, self.pos.step, self.pos.skipped_nonfinite)
        limit = self.cfg.train.max_nonfinite_in_a_row
        if stop and longest >= limit:
            raise FloatingPointError(
                f"{longest} non-finite losses in a row by step {self.pos.step}: stopping. "
                "Lower optim.lr, check the data (data.on_error) or use train.precision=fp32")

    def _stop_requested(self) -> bool:
        flag = torch.tensor([int(self.signals.flag)], dtype=torch.int32)
        if self.world > 1:
            flag = flag.to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ----------------------------------------------------------------- loop

    def fit(self) -> Position:
        t = self.cfg.train
        accum = t.grad_accum
        nonfinite_run = 0
        last_log_t, last_log_step = time.time(), self.pos.step
        try:
            while self.pos.epoch < t.epochs and self.pos.step < self.total_steps:
                stream = self._stream(self.pos.epoch, start_step=self.pos.step_in_epoch * accum)
                micro = 0
                stats = None
                exhausted = True
                for batch in stream:
                    if self.pos.step_in_epoch >= self.steps_per_epoch:
                        break  # the trailing micro-batches of an incomplete accumulation window
                    t0 = time.time()
                    logs_next = (self.pos.step + 1) % t.log_every == 0 or self.pos.step + 1 == self.total_steps
                    out = self.step_fn.micro_step(batch, self.pos.step, grad_norm=logs_next)
                    if out is None:
                        nonfinite_run += 1
                        self.pos.skipped_nonfinite += 1
                        log.warning("non-finite loss at step %d: micro-batch skipped (%d in a row)",
                                    self.pos.step, nonfinite_run)
                        if nonfinite_run >= t.max_nonfinite_in_a_row:
                            raise FloatingPointError(
                                f"{nonfinite_run} non-finite losses in a row at step {self.pos.step}: stopping. "
                                "Lower optim.lr, check the data (data.on_error) or use train.precision=fp32")
                        continue
                    nonfinite_run = 0
                    stats = out
                    micro += 1
                    if micro % accum:
                        continue
                    self.pos.step += 1
                    self.pos.step_in_epoch += 1
                    step_time = time.time() - t0
                    if self.pos.step % t.log_every == 0 or self.pos.step == self.total_steps:
                        self._count_device_skips(stop=True)
                        self._log(stats, step_time, last_log_t, last_log_step)
                        last_log_t, last_log_step = time.time(), self.pos.step
                        if self._stop_requested():
                            raise StopRequested()
                    if t.ckpt_every_steps and self.pos.step % t.ckpt_every_steps == 0:
                        self.save()
                    if self.pos.step == self._fault_kill:  # fault injection (tests): _parse_fault_kill
                        log.warning("USER_DIST_FAULT_KILL: rank %d kills itself after step %d", self.rank,
                                    self.pos.step)
                        os.kill(os.getpid(), signal.SIGKILL)
                    if self.pos.step >= self.total_steps:
                        exhausted = False
                        break
                # An epoch also ends when its stream runs dry early (skipped
                # non-finite micro-batches), never by restarting the stream.
                if exhausted or self.pos.step_in_epoch >= self.steps_per_epoch:
                    self.pos.epoch += 1
                    self.pos.step_in_epoch = 0
                    if t.validate_every_epochs and self.pos.epoch % t.validate_every_epochs == 0:
                        self.validate()
                    self.save()
                elif self.pos.step >= self.total_steps and not (
                        t.ckpt_every_steps and self.pos.step % t.ckpt_every_steps == 0):
                    self.save()  # unless this very step was just saved
        except StopRequested:
            log.warning("stop requested: saving a checkpoint at step %d and exiting", self.pos.step)
            self.save()
        finally:
            self.monitor.flush()
        return self.pos

    def _log(self, stats: Dict[str, torch.Tensor], step_time: float, t_prev: float, step_prev: int) -> None:
        host = to_host(stats)
        t = self.cfg.train
        elapsed = max(1e-9, time.time() - t_prev)
        samples = (self.pos.step - step_prev) * t.batch_size * t.grad_accum * self.world
        values = {f"train/{k}": v for k, v in host.items()}
        values.update({
            "perf/samples_per_s": samples / elapsed,
            "perf/step_time_s": step_time,
            "train/epoch": float(self.pos.epoch),
            "train/skipped_nonfinite": float(self.pos.skipped_nonfinite),
            "queue/pool_size": float(self.queue.pool_size),
        })
        if "train/grad_norm" not in values and self.engine.get_global_grad_norm() is not None:
            values["train/grad_norm"] = float(self.engine.get_global_grad_norm())  # ZeRO 1-2 keep it
        for i, g in enumerate(self.engine.optimizer.param_groups):
            values[f"lr/group{i}"] = g["lr"]
        self.monitor.scalars(values, self.pos.step)
        self.monitor.progress(self.pos.step, self.pos.epoch, values)

    # ----------------------------------------------------------------- validation

    def validate(self) -> Optional[float]:
        """rsum on the val split (generic protocol); keeps the best checkpoint."""
        from .data import eval_loader
        from .evaluation.encode import encode_split
        from .evaluation.metrics import evaluate

        model = self.engine.module
        was_training = model.training
        batches = eval_loader(self.cfg.data.val_shards, self.cfg.data, self.tokenizer, self.cfg.eval.batch_size,
                              rank=self.rank, world_size=self.world)
        dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32
        try:
            split = encode_split(model, batches, self.device, dtype)
        finally:
            model.train(was_training)
        rsum = None
        if du.is_main():
            m = evaluate(split.similarities().numpy(), "generic", source=self.cfg.data.val_shards)
            rsum = m["rsum"]
            self.monitor.scalars({f"val/{k}": float(v) for k, v in m.items() if not isinstance(v, (list, dict))},
                                 self.pos.step)
            log.info("validation at epoch %d: rsum %.2f (i2t R@1 %.2f, t2i R@1 %.2f)", self.pos.epoch, rsum,
                     m["i2t_r1"], m["t2i_r1"])
        # Rank 0 scored; every rank needs the same best tag (for pruning).
        box = torch.tensor([float("nan") if rsum is None else rsum], dtype=torch.float64, device=self.device)
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
