"""What cached gradient accumulation (``train.accum_mode=cached``, GradCache,
Gao et al. 2021) needs to run a micro-batch's forward twice as if once.

The cached step (:meth:`user_dist.train_step.TrainStep.cached_step`) runs
each micro-batch through the online towers twice: first without gradient
(embeddings only), then again with gradient, to back-propagate its share of
the loss's gradient. The two passes must compute the same function:

- :class:`RngState`: dropout (any randomness of the towers) draws from the
  global CPU and device generators; the state saved before a micro-batch's
  first pass is put back before its recompute, so both draw the same masks.
- :class:`TrainingBuffers`: a forward in training mode updates BatchNorm
  running statistics (``MaskedBatchNorm``, torch's BatchNorm, a backbone's
  norms). Their values before the first passes are put back after them, so
  that only the recomputes update them: once per micro-batch, as plain
  accumulation does. Training-mode outputs never read them, so the first
  pass's outputs do not depend on this.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch


class RngState:
    """The global torch generators' state: the CPU one and, on CUDA, the
    device's (the only generators the towers draw dropout from)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda: Optional[torch.Tensor] = (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class TrainingBuffers:
    """A copy of the buffers of every submodule of ``module`` in training mode
    (running statistics, batch counters), to put back with :meth:`restore`.
    Modules in eval mode (a frozen CLIP) change nothing in a forward and are
    left out."""

    def __init__(self, module: torch.nn.Module):
        self.saved: List[Tuple[torch.Tensor, torch.Tensor]] = [
            (b, b.detach().clone()) for m in module.modules() if m.training for b in m.buffers(recurse=False)]

    @torch.no_grad()
    def restore(self) -> None:
        for live, copy in self.saved:
            live.copy_(copy)
