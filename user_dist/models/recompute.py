"""Gradient checkpointing of our own modules (``train.grad_checkpointing``).

:func:`checkpoint` runs a function without keeping its intermediate
activations; backward runs it again (the *recomputation*) to get them. It is
torch.utils.checkpoint, non-reentrant, with the RNG state preserved: the
recomputation draws the same dropout masks as the forward, so gradients
equal those of the plain forward to float rounding (tests/test_grad_checkpointing.py).

In-place state updates must happen once per forward, not again in the
recomputation: :func:`recomputing` says whether one is running, and
MaskedBatchNorm leaves its running statistics alone then. The flag is a
process global, not a thread-local, because CUDA runs backward (and so the
recomputation) on autograd's own thread.

The towers from libraries checkpoint with their own switches (transformers'
``activation_checkpointing_enable``, open_clip's and timm's
``set_grad_checkpointing``), which wrap the same torch.utils.checkpoint.

Under torch.compile (``train.compile``) the checkpointed region becomes a
tagged subgraph that the compiled backward recomputes from the graph itself:
in-place updates are functionalised into the forward graph and never
replayed (the running statistics move once: tested), and random ops are
recomputed from the forward's seed (AOTAutograd functionalises their RNG).
Dynamo refuses a ``context_fn`` there, so none is passed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

_RECOMPUTING = [False]


def recomputing() -> bool:
    """True while backward recomputes a checkpointed forward."""
    return _RECOMPUTING[0]


@contextlib.contextmanager
def _recomputation() -> Iterator[None]:
    saved = _RECOMPUTING[0]
    _RECOMPUTING[0] = True
    try:
        yield
    finally:
        _RECOMPUTING[0] = saved


def _contexts():
    return contextlib.nullcontext(), _recomputation()


def checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with its activations recomputed in backward. Without
    gradient (key towers, evaluation) it is a plain call: nothing to save."""
    if not torch.is_grad_enabled():
        return fn(*args)
    if torch.compiler.is_compiling():
        return _torch_checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return _torch_checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_contexts)
