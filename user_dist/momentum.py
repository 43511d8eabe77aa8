"""Momentum ("key") towers: an fp32 EMA copy of the online model, outside
the DeepSpeed engine (which would cast it to bf16, where m = 0.999 loses
most updates).

    theta_k <- m theta_k + (1 - m) theta_q        once per optimiser step

Created as a deep copy of the online model, broadcast from rank 0 so every
rank starts identical; the weights are kept identical by identical updates.
Buffers are not: each rank's online BatchNorm statistics average its own
batches, and so do the key towers' (below), so a checkpoint keeps every
rank's (TrainStep.checkpoint_state). The frozen online CLIP (if any) is
shared, not copied: it never changes.

Keys are produced in eval mode by default (no dropout, BatchNorm running
statistics); ``queue.key_train_mode`` reproduces the reference (train mode).
In eval mode the key towers' BatchNorm running statistics are an EMA of the
online ones with the same m (floating buffers are averaged like
parameters), so they move on the time scale of the key weights. In train
mode the key towers keep their own running statistics.

Frozen parts (``model.image.freeze``, ``model.text.freeze``) are left out
of the update: their parameters, and the buffers of modules whose
parameters are all frozen (a frozen backbone's BatchNorm statistics, fixed
in eval mode). The key copy of a frozen weight is therefore the weight
itself, bit for bit, at any precision: an EMA towards a bf16/fp16 module's
copy would drift, and would cost a lerp per frozen tensor per step.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from user_dist.config import QueueConfig
from user_dist.distributed import broadcast_module_state


class MomentumTowers:
    """fp32 key copy of a RetrievalModel.

    Args:
        model: the online RetrievalModel (before or after the engine wraps it).
        cfg: queue.momentum (m) and queue.key_train_mode.
    """

    def __init__(self, model: nn.Module, cfg: QueueConfig):
        shared = getattr(model, "clip", None)
        memo = {id(shared): shared} if shared is not None else {}
        self.module = copy.deepcopy(model, memo)
        self._shared = {id(t) for t in (shared.parameters() if shared is not None else ())}
        self._shared |= {id(t) for t in (shared.buffers() if shared is not None else ())}
        for t in self._own(self.module.parameters()) + self._own(self.module.buffers()):
            if t.is_floating_point():
                t.data = t.data.float()
        self.module.requires_grad_(False)
        self.momentum, self.train_mode = cfg.momentum, cfg.key_train_mode
        self.module.train(self.train_mode)
        self._cache = None  # (online module, key tensors, online tensors) of the last update
        broadcast_module_state(self.module)

    def _own(self, tensors) -> List[torch.Tensor]:
        return [t for t in tensors if id(t) not in self._shared]

    def to(self, device) -> "MomentumTowers":
        self.module.to(device)
        return self

    @torch.no_grad()
    def encode(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys of a batch: img_k, txt_k (B, E), fp32, no gradient."""
        self.module.train(self.train_mode)
        img, txt = self.module(batch)
        return img.float(), txt.float()

    def _pairs(self, online: nn.Module, buffers: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Matching (key, online) floating tensors by name, trainable parameters
        (and, when asked, the floating buffers of modules that are not frozen)."""
        key_p = dict(self.module.named_parameters())
        keys, vals = [], []
        for name, p in online.named_parameters():
            if p.requires_grad:
                keys.append(key_p[name])
                vals.append(p.detach())
        if buffers:
            key_b = dict(self.module.named_buffers())
            for prefix, module in online.named_modules():
                own = list(module.parameters(recurse=False))
                if own and not any(p.requires_grad for p in own):
                    continue  # a frozen module's statistics: fixed (eval mode)
                for name, b in module.named_buffers(prefix=prefix, recurse=False):
                    if b.is_floating_point() and id(key_b[name]) not in self._shared:
                        keys.append(key_b[name])
                        vals.append(b)
        return keys, vals

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """One EMA step towards the online module (call on the accumulation
        boundary, after the optimiser step)."""
        if self._cache is None or self._cache[0] is not online:
            self._cache = (online, *self._pairs(online, buffers=not self.train_mode))
        _, keys, vals = self._cache
        vals = [v.float() for v in vals]  # bf16 online tensors become fp32 copies
        torch._foreach_lerp_(keys, vals, 1.0 - self.momentum)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The key towers' own tensors (the shared frozen CLIP left out)."""
        return {k: v for k, v in self.module.state_dict().items() if not k.startswith("clip.")}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("clip.")]
        if missing or unexpected:
            raise ValueError(f"momentum tower state does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]} (was it saved with a different model config?)")
