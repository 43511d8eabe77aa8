"""One training step of USER: DeepSpeed engine, fp32 key towers, queues, UTO.

One optimiser step (``train.grad_accum`` micro-steps), in the phases of
:attr:`TrainStep.PHASES`:

    inputs     batch to the device (the key towers' copy in fp32)
    forward    img, txt = engine(batch)                   online towers, (B, E), grad
    keys       img_k, txt_k = momentum.encode(batch)      key towers, fp32, no grad
    loss       uto_loss(img, txt, img_k, txt_k, ids, queue); every rank agrees it is finite
    backward   engine.backward(loss); at the boundary: clip, gradient norm
    optimizer  engine.step()
    momentum   at the boundary: momentum.update(online towers)
    enqueue    queue.enqueue(img_k, txt_k, ids)           every micro-step, after the loss

Gradient accumulation (``train.accum_mode=plain``, :meth:`TrainStep.micro_step`
per micro-batch): keys of every micro-batch are enqueued (the queue sees
every sample once per epoch, as without accumulation), while the momentum
towers move once per optimiser step, since theta_q only changes then.

Cached accumulation (``train.accum_mode=cached``, :meth:`TrainStep.cached_step`
per window of ``grad_accum`` micro-batches, GradCache): UTO over the whole
accumulated batch, as one big batch, in the same phases:

    inputs     every micro-batch to the device
    forward    img_j, txt_j = engine(batch_j), no grad    RNG state saved before each
    keys       img_k, txt_k = momentum.encode(batch_j)
    loss       uto_loss over the concatenated embeddings (leaves), then its
               gradient with respect to them: g (k B, E)
    backward   per micro-batch: RNG state restored, engine(batch_j) again with
               grad, engine.backward((emb_j * g_j).sum()); at the boundary: clip, norm
    optimizer  engine.step()
    momentum   momentum.update(online towers)
    enqueue    queue.enqueue(every micro-batch's keys)    once

The step needs no data stream, run folder or monitor, so that
launch/benchmark.py times exactly the step that launch/train.py runs: it sets
:attr:`TrainStep.clock` to time each phase.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch

from . import distributed as du
from .config import Config, ConfigError
from .deepspeed_config import resolve, step_owns_optimizer, take_clipping
from .faults import Faults
from .grad_cache import RngState, TrainingBuffers
from .nonfinite import DeviceSkips, HostSkips
from .schedule import build_scheduler


def _no_clock(phase: str) -> ContextManager:  # noqa: ARG001
    return contextlib.nullcontext()


def inputs_to(batch: Dict[str, Any], device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """Move a batch to the device; floating inputs take ``dtype``."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def build_engine(model: torch.nn.Module, cfg: Config, ds_cfg: Dict[str, Any], steps_per_epoch: int,
                 total_steps: int, owns_optimizer: bool) -> Tuple[Any, torch.optim.Optimizer, float]:
    """The DeepSpeed engine around the online towers, with AdamW and the lr schedule.

    ``owns_optimizer``: the step calls the optimiser itself
    (:func:`user_dist.deepspeed_config.step_owns_optimizer`). Returns
    ``(engine, optimizer, clip)``: ``clip`` is the max gradient norm the step
    clips to itself (0: DeepSpeed clips, or nobody;
    :func:`user_dist.deepspeed_config.take_clipping` takes it out of ``ds_cfg``).
    """
    import logging

    import deepspeed

    from .config import ConfigError
    from .deepspeed_config import zero_stage
    from .optimizer_state import summary

    stage = zero_stage(ds_cfg)
    if stage >= 3:
        # Only a DeepSpeed JSON can ask for it (train.zero_stage allows 0-2).
        raise ConfigError(
            f"ZeRO stage {stage} (train.deepspeed_config {cfg.train.deepspeed_config}) is not supported: it "
            "partitions the parameters themselves, while the fp32 key towers copy and follow them whole, "
            "frozen towers (model.*.freeze) are restored from them, and the checkpoint's fp32 export reads "
            "them. Use ZeRO 1 or 2 (optimiser state, and with 2 the gradients, split over the ranks)")
    o = cfg.optim
    # When the optimiser step is ours, non-finite steps are skipped on the
    # device (user_dist.nonfinite), which needs the fused AdamW's found_inf
    # (CUDA and CPU).
    fused = torch.cuda.is_available() or owns_optimizer
    # Frozen parameters (model.*.freeze) are in no group: no Adam moments, and
    # no place in ZeRO's flat fp32 partitions, which hold the groups' parameters only.
    groups = model.param_groups(o)
    assert all(p.requires_grad for g in groups for p in g["params"]), "a frozen parameter in an optimiser group"
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=fused or None)
    if du.is_main():
        s = summary(model, stage, du.world_size())
        frozen = (f"; {s['frozen'] / 1e6:.2f}M frozen parameters take none (-{s['saved_bytes'] / 2 ** 20:.1f} MiB)"
                  if s["frozen"] else "")
        logging.getLogger("user_dist").info(
            "optimiser: AdamW over %.2fM trained parameters, %.1f MiB of state per rank (ZeRO %d, %d ranks)%s",
            s["trained"] / 1e6, s["state_bytes"] / 2 ** 20, stage, du.world_size(), frozen)
    scheduler = build_scheduler(optimizer, o, steps_per_epoch, total_steps)
    clip = take_clipping(ds_cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    if du.world_size() == 1 and engine.zero_optimization_stage() == 0:
        # One rank: DeepSpeed's gradient "all-reduce" would flatten every
        # gradient into a bucket and copy it back, for nothing.
        engine.enable_backward_allreduce = False
    return engine, optimizer, clip


def _flatten_rnn_weights(modules) -> None:
    """cuDNN wants each RNN's weights in one flat buffer; deep copies and
    device moves leave them apart, and every call then compacts them (a copy
    and a warning per GRU call). Call before anything (the optimiser's state,
    the momentum pairs) holds their storage."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, torch.nn.RNNBase):
                m.flatten_parameters()


class TrainStep:
    """The objects of one training step and the step itself: ``micro_step``
    per micro-batch, or, when ``cached`` (train.accum_mode=cached with
    grad_accum > 1), ``cached_step`` per accumulation window.

    Parts (public, read by the trainer, the benchmark and tests): ``engine``
    (DeepSpeed, around the online towers), ``momentum`` (fp32 key towers),
    ``queue`` (negatives), ``skips`` (non-finite counts: DeviceSkips or
    HostSkips), ``device``, ``zero_stage`` (in force), ``cached``, ``clock``.

    Args:
        steps_per_epoch, total_steps: optimiser steps, for the lr schedule.
        ds_config: the final DeepSpeed config (default: resolved from ``cfg``).
        load_universal: the engine will load a ZeRO 1-2 checkpoint of another
            world size through DeepSpeed's universal format (a ResumePlan's
            ``universal``).
        faults: test hooks (user_dist.faults); none by default.
    """

    PHASES = ("inputs", "forward", "keys", "loss", "backward", "optimizer", "momentum", "enqueue")

    def __init__(self, cfg: Config, steps_per_epoch: int, total_steps: int, *,
                 ds_config: Optional[Dict[str, Any]] = None, load_universal: bool = False,
                 faults: Optional[Faults] = None):
        from .loss import compiled_uto_terms, uto_loss
        from .models import build_model
        from .momentum import MomentumTowers
        from .queue import NegativeQueues

        t = cfg.train
        # Cached accumulation: the trainer hands each window to cached_step. With
        # one micro-batch per step there is nothing to cache: micro_step is the same.
        self.cached = t.accum_mode == "cached" and t.grad_accum > 1
        if self.cached and t.batch_size * t.grad_accum > cfg.queue.size_per_rank:
            # One enqueue of every micro-batch's keys per optimiser step.
            raise ConfigError(
                f"train.accum_mode=cached enqueues train.batch_size x train.grad_accum = "
                f"{t.batch_size * t.grad_accum} keys per rank per optimiser step, more than the "
                f"{cfg.queue.size_per_rank} slots per rank of the pool (queue.size_per_rank, or queue.global_size "
                "/ ranks): raise the pool or use train.accum_mode=plain")
        self.cfg = cfg
        self.faults = faults or Faults()
        # clock(phase) is entered around each phase of micro_step; the
        # benchmark sets its own to time them.
        self.clock: Callable[[str], ContextManager] = _no_clock
        ds_cfg = dict(ds_config if ds_config is not None else resolve(cfg, du.world_size()))
        if load_universal:
            ds_cfg["checkpoint"] = dict(ds_cfg.get("checkpoint", {}), load_universal=True)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        # Same seed on every rank: identical initial towers (DeepSpeed broadcasts
        # parameters, not buffers) and identical momentum copies.
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, cfg.data.mode)
        du.broadcast_module_state(model)
        # The key towers are copied in fp32 before DeepSpeed wraps the module.
        self.momentum = MomentumTowers(model, cfg.queue)
        if t.grad_checkpointing:  # the online towers only: the key towers never run a backward
            model.set_grad_checkpointing(True)
        owns_optimizer = step_owns_optimizer(ds_cfg)  # no ZeRO, no fp16
        self.engine, optimizer, self.clip = build_engine(model, cfg, ds_cfg, steps_per_epoch, total_steps,
                                                         owns_optimizer)
        self.device = self.engine.device
        self.zero_stage = self.engine.zero_optimization_stage()  # in force, after any user override
        self.skips = DeviceSkips(self.device) if owns_optimizer else HostSkips()
        if isinstance(self.skips, DeviceSkips):
            optimizer.found_inf = self.skips.found_inf  # read by the fused AdamW at every step, as GradScaler sets it
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        # Input dtype: the module's (fp16 casts it; bf16 runs fp32 weights under autocast).
        self.dtype = next(self.engine.module.parameters()).dtype
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
        self.momentum.to(self.device)
        if self.device.type == "cuda":
            # ZeRO 1-2 own the parameters' storage in their flat partitions: leave it.
            _flatten_rnn_weights(([self.engine.module] if self.zero_stage == 0 else []) + [self.momentum.module])
        self.uto_loss = uto_loss
        if t.compile != "none":
            # In place: parameter names, and so checkpoints, stay as they are.
            self.engine.module.compile_towers(t.compile)
            self.momentum.module.compile_towers(t.compile)
            # The loss too: its ~150 small kernels (forward and backward) become
            # two graphs (a pool sharded over ranks stays eager: collectives).
            self.uto_loss = functools.partial(uto_loss, terms=compiled_uto_terms(t.compile))
        self.queue = NegativeQueues(cfg.queue, cfg.model.embed_size, self.device)

    def micro_step(self, batch: Dict[str, Any], step: int = 0,
                   grad_norm: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        """Forward + backward of one micro-batch at optimiser step ``step``.

        Returns the loss statistics (with ``grad_norm``, the global gradient
        norm before clipping, as a tensor). A non-finite loss: with
        DeviceSkips the step is skipped on the device and the statistics are
        returned as usual (the loss among them, non-finite); with HostSkips
        the micro-batch is dropped before the backward on every rank and
        None is returned.
        """
        if self.cfg.train.compile == "reduce-overhead":
            # CUDA graph trees: a new step begins here, so the graphs' outputs of
            # the last step (all consumed by now) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        with self.clock("inputs"):
            b32 = inputs_to(batch, self.device, torch.float32)  # the key towers are fp32
            # One copy to the device; a second cast only when the module is not fp32 (fp16).
            b = b32 if self.dtype == torch.float32 else inputs_to(b32, self.device, self.dtype)
        with self.clock("forward"):
            img, txt = self.engine(b)
        with self.clock("keys"), torch.no_grad(), self.autocast:
            img_k, txt_k = self.momentum.encode(b32)
        with self.clock("loss"):
            loss, stats = self.uto_loss(img.float(), txt.float(), img_k, txt_k, b["image_ids"], self.queue,
                                        self.cfg.loss)
            loss = self.faults.poison(loss, step)
            keep = self.skips.check_loss(loss)  # every rank the same: a device tensor, or a host bool
        if keep is False:  # HostSkips: dropped before any rank's backward
            return None
        stats = dict(stats)
        with self.clock("backward"):
            self.engine.backward(loss)
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary:
                norm = self._clip_or_norm(grad_norm)
                if norm is not None:
                    stats["grad_norm"] = norm
                    self.skips.check_norm(norm)
        with self.clock("optimizer"):
            if boundary:
                self.skips.before_step()
            self.engine.step()
        with self.clock("momentum"):
            if boundary:
                self.momentum.update(self.engine.module)
                self.skips.after_step()
        with self.clock("enqueue"):
            self.queue.enqueue(img_k, txt_k, b["image_ids"], keep=keep if torch.is_tensor(keep) else None)
        stats["loss"] = loss.detach().clone()  # the loss may live in a CUDA graph's reused output memory
        return stats

    def cached_step(self, batches: List[Dict[str, Any]], step: int = 0,
                    grad_norm: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        """One optimiser step over an accumulation window of ``grad_accum``
        micro-batches (``train.accum_mode=cached``), whose in-batch negatives
        are every pair of the window on every rank: the loss, the gradients,
        the queue and the momentum towers of one batch of ``grad_accum x B``
        pairs per rank (the micro-batches concatenated in order), with each
        micro-batch's forward computed on its own (its BatchNorm statistics
        and dropout masks are those of its own pass, as in plain accumulation).

        Returns the loss statistics of the whole window, as
        :meth:`micro_step` does for one micro-batch; with HostSkips, None when
        the window's loss is not finite (the whole window is dropped before
        any backward, on every rank).
        """
        t, engine, k = self.cfg.train, self.engine, len(batches)
        if k != t.grad_accum or engine.micro_steps % t.grad_accum:
            raise RuntimeError(f"cached_step takes a whole accumulation window: {t.grad_accum} micro-batches from "
                               f"its start, got {k} at engine micro-step {engine.micro_steps}")
        with self.clock("inputs"):
            b32s = [inputs_to(b, self.device, torch.float32) for b in batches]  # the key towers are fp32
            bs = b32s if self.dtype == torch.float32 else [inputs_to(b, self.device, self.dtype) for b in b32s]
        with self.clock("forward"), torch.no_grad():
            # Only the recompute below may update running statistics: once per micro-batch.
            buffers = TrainingBuffers(engine.module)
            rngs, embs = [], []
            for b in bs:
                rngs.append(RngState(self.device))  # the recompute draws the same dropout masks
                img, txt = engine(b)
                embs.append((img.float(), txt.float()))
            buffers.restore()
        with self.clock("keys"), torch.no_grad(), self.autocast:
            keys = [self.momentum.encode(b) for b in b32s]
            rng_after = RngState(self.device)  # where the step's draws end, once the recompute is done
        with self.clock("loss"):
            # The window's embeddings as leaves: (k B, E) each, micro-batches in order.
            img = torch.cat([e[0] for e in embs]).requires_grad_()
            txt = torch.cat([e[1] for e in embs]).requires_grad_()
            img_k, txt_k = torch.cat([kk[0] for kk in keys]), torch.cat([kk[1] for kk in keys])
            ids = torch.cat([b["image_ids"] for b in bs])
            loss, stats = self.uto_loss(img, txt, img_k, txt_k, ids, self.queue, self.cfg.loss)
            loss = self.faults.poison(loss, step)
            keep = self.skips.check_loss(loss)  # one decision for the window
            if keep is False:  # HostSkips: dropped before any rank's backward
                return None
            # d loss / d embeddings, through the all-gathers (and a sharded pool's
            # all-reduce): what the towers' backward of one big batch would receive.
            g_img, g_txt = torch.autograd.grad(loss, (img, txt))
        stats = dict(stats)
        with self.clock("backward"):
            rows = 0
            for j, b in enumerate(bs):
                rngs[j].restore()
                img_j, txt_j = engine(b)
                n = img_j.shape[0]
                surrogate = ((img_j.float() * g_img[rows:rows + n]).sum()
                             + (txt_j.float() * g_txt[rows:rows + n]).sum())
                rows += n
                # The surrogate's gradient is the loss's own share: no division by grad_accum.
                engine.backward(surrogate, scale_wrt_gas=False)
                if j < k - 1:
                    engine.step()  # inside the window: DeepSpeed counts the micro-step, no update
            rng_after.restore()
            if not engine.is_gradient_accumulation_boundary():
                raise RuntimeError(f"DeepSpeed's micro-step count ({engine.micro_steps}) is off the accumulation "
                                   f"window of {k}: was micro_step mixed with cached_step?")
            norm = self._clip_or_norm(grad_norm)
            if norm is not None:
                stats["grad_norm"] = norm
                self.skips.check_norm(norm)
        with self.clock("optimizer"):
            self.skips.before_step()
            engine.step()
        with self.clock("momentum"):
            self.momentum.update(engine.module)
            self.skips.after_step()
        with self.clock("enqueue"):
            self.queue.enqueue(img_k, txt_k, ids, keep=keep if torch.is_tensor(keep) else None)
        stats["loss"] = loss.detach().clone()
        return stats

    def _clip_or_norm(self, wanted: bool) -> Optional[torch.Tensor]:
        """At the boundary: clip (when the step clips) and return the global
        gradient norm before clipping; or only measure it when ``wanted``
        without ZeRO (DeepSpeed keeps none then). None otherwise."""
        if self.clip > 0:
            # The gradients are whole and averaged over ranks here (ZeRO 0
            # all-reduces in backward): every rank computes the same norm.
            return torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        if wanted and self.zero_stage == 0:
            grads = [p.grad for p in self.params if p.grad is not None]
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return None

    # ------------------------------------------------------------------ what the trainer reads

    def learning_rates(self) -> list:
        """The current lr of each optimiser parameter group."""
        return [g["lr"] for g in self.engine.optimizer.param_groups]

    def deepspeed_grad_norm(self) -> Optional[float]:
        """The last step's gradient norm as DeepSpeed keeps it (ZeRO 1-2), or None."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def checkpoint_state(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """(the key towers' state, this rank's own state) for a checkpoint.

        This rank's own state holds its queue shard and its buffers, online
        and key towers (:meth:`load_rank_buffers`): BatchNorm running
        statistics average each rank's own batches (DeepSpeed keeps the
        parameters identical across ranks, not the buffers), and the key
        towers' follow the online ones, while the engine's checkpoint and
        momentum.pt hold rank 0's only.
        """
        buffers = {"online": _own_buffers(self.engine.module), "keys": _own_buffers(self.momentum.module)}
        return self.momentum.state_dict(), {"queue": self.queue.state_dict(), "buffers": buffers}

    def load_rank_buffers(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Put back this rank's buffers saved by :meth:`checkpoint_state` (a
        resume on the ranks that saved), after the engine and the key towers
        were loaded (which gave every rank rank 0's). Copied in place, bit for
        bit: the key towers' EMA pairs keep pointing at the online buffers."""
        for part, module in (("online", self.engine.module), ("keys", self.momentum.module)):
            own = dict(module.named_buffers())
            unknown = sorted(state[part].keys() - own.keys())
            if unknown:
                raise ValueError(f"the checkpoint's {part} buffers {unknown[:3]} are not in this model: was it "
                                 "saved with a different model config?")
            with torch.no_grad():
                for name, value in state[part].items():
                    own[name].copy_(value)


def _own_buffers(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A module's persistent buffers (BatchNorm running statistics and
    counts), CPU copies; the shared frozen CLIP's (``clip.``, identical on
    every rank) left out."""
    buffers = {name for name, _ in module.named_buffers()}
    return {name: t.detach().cpu().clone() for name, t in module.state_dict().items()
            if name in buffers and not name.startswith("clip.")}
