"""Communication: what the step's collectives move, counted where every
collective passes, and what the code declares they move.

Counting. Every torch.distributed collective, whatever Python function made
it (``dist.all_reduce``, ``dist.reduce_scatter_single``, DeepSpeed's comm
layer, ``torch.distributed.nn``, functional collectives), reaches the
ProcessGroup as an operator of the dispatcher's ``c10d`` namespace
(``_c10d_functional`` for functional collectives). :class:`CommCounter` is a
``TorchDispatchMode`` that sees every operator and counts every one of those
namespaces; an operator there that it cannot classify raises
:class:`UnknownCollective` instead of going uncounted, so a renamed torch
function cannot be missed. The payload is read from the operator's schema
(arguments named ``input*``/``tensor(s)``, or ``output*``/``out``).

Why not the profiler: torch.profiler's ``record_param_comms`` events (with
"Collective name", "In msg nelems", ...) come from NCCL only; under gloo
(torch 2.14.1, CPU) the profiler records ``c10d::allreduce_`` without the
shapes of tensor lists and ``gloo:*`` events without dtypes.

Payload of one call, in bytes: all-reduce, broadcast, reduce: the tensor;
all-gather: the gathered result (world x input); reduce-scatter: the input;
all-to-all: what this rank sends (its input); barrier: nothing.

Declared: :func:`declared` lists the collectives of one micro-step as the
code makes them (loss, queue, synced norms, gradients, finite-loss check),
by phase of ``TrainStep.PHASES`` and kind; tests/test_benchmark.py checks
it against the count, byte for byte.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from user_dist.config import Config

from .common import nbytes, sync

NAMESPACES = ("c10d", "_c10d_functional")
# Operators of those namespaces that move nothing between ranks.
NOT_COLLECTIVES = {"wait_tensor", "_wrap_tensor_autograd", "check_for_nan"}
# Kind by the operator's name without underscores (allgather_, _allgather_base_
# and all_gather_into_tensor all start with "allgather"); first match wins.
KINDS = (("allreduce", "all_reduce"), ("allgather", "all_gather"), ("reducescatter", "reduce_scatter"),
         ("alltoall", "all_to_all"), ("broadcast", "broadcast"), ("reduce", "reduce"), ("gather", "gather"),
         ("scatter", "scatter"), ("barrier", "barrier"), ("monitoredbarrier", "barrier"), ("send", "p2p"),
         ("isend", "p2p"), ("recv", "p2p"), ("irecv", "p2p"), ("batchp2p", "p2p"))
# Kinds whose payload is what they write (the gathered result), not what they read.
OUTPUT_PAYLOAD = {"all_gather"}
# Bytes each payload byte puts on the wire of a ring of k ranks, times (k - 1) / k.
RING_FACTOR = {"all_reduce": 2}
# Bytes per element of what the step's collectives move (the loss and queue
# make features and keys float32, ids int64; the finite-loss flag is int32).
FP32, INT64, INT32 = 4, 8, 4


class UnknownCollective(RuntimeError):
    pass


def collective_kind(op) -> str:
    """'all_reduce', 'all_gather', ... of a c10d operator; '' for one that moves nothing."""
    name = op._schema.name.split("::")[1]
    if name in NOT_COLLECTIVES:
        return ""
    for prefix, kind in KINDS:
        if name.replace("_", "").startswith(prefix):
            return kind
    raise UnknownCollective(f"{op._schema.name}: a collective launch/bench/comm.py cannot classify; add its name "
                            "to KINDS (or to NOT_COLLECTIVES if it moves nothing between ranks)")


def _tensors(x) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _tensors(item)


def payload(op, kind: str, args: tuple, kwargs: dict, out) -> int:
    """Bytes one call moves (module docstring), from the schema's argument names."""
    if kind == "barrier":
        return 0
    named = dict(zip((a.name for a in op._schema.arguments), args), **kwargs)
    if kind in OUTPUT_PAYLOAD:
        chosen = [v for k, v in named.items() if k.startswith("output") or k == "out"]
        chosen = chosen or [out]  # functional collectives return the gathered tensor
    else:
        chosen = [v for k, v in named.items() if k.startswith("input") or k in ("tensor", "tensors")]
    return sum(nbytes(t) for t in _tensors(chosen))


class CommCounter(TorchDispatchMode):
    """Counts every collective made while active: calls and payload bytes per
    ``"phase: kind"`` (``phase_of()`` names the phase running), and the
    seconds spent in them (each waited for, and the device synced)."""

    def __init__(self, phase_of: Callable[[], str], device: torch.device):
        super().__init__()
        self.phase_of, self.device = phase_of, device
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = collective_kind(func) if func.namespace in NAMESPACES else ""
        if not kind:
            return func(*args, **kwargs)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        for work in (o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.ScriptObject)):
            work.wait()  # gloo works in the background until the caller waits
        sync(self.device)
        self.seconds += time.perf_counter() - start
        key = f"{self.phase_of()}: {kind}"
        self.bytes[key] += payload(func, kind, args, kwargs, out)
        self.calls[key] += 1
        return out


def ring_wire_bytes(kinds_and_bytes: Iterable[Tuple[str, int]], ranks: int) -> float:
    """Bytes a rank sends for these payloads over a ring of ``ranks``: an
    all-reduce of n bytes 2 (k-1)/k n, the others (k-1)/k n."""
    return sum(RING_FACTOR.get(kind, 1) * n for kind, n in kinds_and_bytes) * (ranks - 1) / ranks


# --------------------------------------------------------------------------- declared


class Collective(NamedTuple):
    """What one micro-step moves in one kind of collective: ``nbytes`` of payload per rank."""

    what: str
    phase: str  # of TrainStep.PHASES
    kind: str
    nbytes: int


def sync_norm_widths(model: torch.nn.Module) -> List[int]:
    """Channels C of every synced MaskedBatchNorm of a model (each all-gathers
    (count, mean, M2) = 2C + 1 floats per rank in training mode)."""
    from user_dist.models.gse import MaskedBatchNorm

    return [m.num_features for m in model.modules() if isinstance(m, MaskedBatchNorm) and m.sync]


def loss_collectives(cfg: Config, world: int) -> List[Collective]:
    """user_dist.loss.uto_loss: the in-batch features and ids gathered from
    every rank, the features' gradient reduce-scattered back; with a sharded
    pool, the per-query statistics of the queue term all-reduced."""
    W, B, E = world, cfg.train.batch_size, cfg.model.embed_size
    out = [Collective("in-batch features: image + text gathered", "loss", "all_gather", 2 * W * B * E * FP32),
           Collective("in-batch image ids gathered", "loss", "all_gather", W * B * INT64),
           Collective("in-batch features: gradient reduce-scattered", "backward", "reduce_scatter",
                      2 * W * B * E * FP32)]
    if cfg.queue.mode == "sharded":
        out += [Collective("sharded queue: query max (2 W B)", "loss", "all_reduce", 2 * W * B * FP32),
                Collective("sharded queue: sum-exp, active, count (6 W B)", "loss", "all_reduce", 6 * W * B * FP32),
                Collective("sharded queue: their gradient", "backward", "all_reduce", 6 * W * B * FP32)]
    return out


def queue_collectives(cfg: Config, world: int) -> List[Collective]:
    """user_dist.queue.NegativeQueues.enqueue: the keys (image + text float32,
    id int64) gathered from every rank (replicated), or each sent to the rank
    that owns its slot (sharded: all-to-all, payload what a rank sends)."""
    key = 2 * cfg.model.embed_size * FP32 + INT64
    B = cfg.train.batch_size
    if cfg.queue.mode == "replicated":
        return [Collective("keys to the queue (every rank's)", "enqueue", "all_gather", world * B * key)]
    return [Collective("keys to the queue (to their owners)", "enqueue", "all_to_all", B * key)]


def norm_collectives(norm_widths: Sequence[int], world: int, key_train_mode: bool) -> List[Collective]:
    """user_dist.models.gse.MaskedBatchNorm, synced: (count, mean, M2) of each
    norm gathered in the forward, their gradient reduce-scattered in the
    backward; key towers in train mode gather theirs too."""
    n = sum(world * (2 * c + 1) * FP32 for c in norm_widths)
    out = [Collective("synced norms: statistics gathered", "forward", "all_gather", n),
           Collective("synced norms: their gradient", "backward", "reduce_scatter", n)]
    if key_train_mode:
        out.append(Collective("synced norms of the key towers", "keys", "all_gather", n))
    return out


def declared(cfg: Config, world: int, n_params: int, norm_widths: Sequence[int],
             grad_bytes: int = FP32) -> List[Collective]:
    """Every collective of one micro-step at ``world`` ranks, without ZeRO:
    DeepSpeed's gradient all-reduce (N x grad_bytes; clipping needs none:
    the averaged gradients are equal on every rank), the finite-loss flag
    agreed on (int32), and those of the norms, the loss and the queue. One
    rank communicates nothing."""
    if world == 1:
        return []
    return ([Collective("gradient all-reduce (DeepSpeed)", "backward", "all_reduce", n_params * grad_bytes),
             Collective("finite-loss agreement", "loss", "all_reduce", INT32)]
            + norm_collectives(norm_widths, world, cfg.queue.key_train_mode)
            + loss_collectives(cfg, world) + queue_collectives(cfg, world))


def by_phase(collectives: Iterable[Collective]) -> Dict[str, int]:
    """Bytes per ``"phase: kind"``, as :class:`CommCounter` keys them."""
    out: Dict[str, int] = defaultdict(int)
    for c in collectives:
        out[f"{c.phase}: {c.kind}"] += c.nbytes
    return dict(out)
