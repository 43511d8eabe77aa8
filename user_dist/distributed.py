"""Rank and world discovery for every launcher, and process-group start-up.

One place knows how each launcher describes the job:

- ``deepspeed`` and ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT in the environment (deepspeed also appends ``--local_rank=N``
  to argv, which :func:`strip_local_rank_arg` removes);
- SLURM ``srun``: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node list
  (MASTER_ADDR is the first host of SLURM_JOB_NODELIST unless already set);
- a plain process: rank 0 of 1, no process group needed.

The backend is nccl when CUDA is available and gloo otherwise, so the same
code runs on a GPU cluster and on a CPU laptop.
"""
from __future__ import annotations

import atexit
import datetime
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | deepspeed | slurm | single


def strip_local_rank_arg(argv: List[str]) -> List[str]:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (added by deepspeed)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
            continue
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(a)
    return out


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list like ``node[01-04,07],gpu3``.

    Uses ``scontrol show hostnames`` when present (it knows every syntax),
    else expands the common bracket form itself.
    """
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    # The first host takes the first value of every bracket: rack[1-2]-n[07,09] -> rack1-n07.
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def discover(environ: Optional[dict] = None) -> DistEnv:
    """Read rank/world/master from whichever launcher started this process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun and the deepspeed launcher both set these. deepspeed's
        # launcher also sets CROSS_RANK (its node rank) and appends
        # --local_rank to argv (absent with --no_local_rank); torchrun sets
        # TORCHELASTIC_RUN_ID. Anything else exported them by hand (env://).
        launcher = "torchrun"
        if "TORCHELASTIC_RUN_ID" not in env and ("CROSS_RANK" in env or "DS_ACCELERATOR" in env or (
                environ is None and any(a.startswith("--local_rank") for a in sys.argv))):
            launcher = "deepspeed"
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), launcher)
    # Only a task of an srun step is a rank: the batch script itself (and an
    # salloc shell) also carries SLURM_PROCID=0 and the job's SLURM_NTASKS, but
    # no SLURM_STEP_ID, and must not wait for peers that never come.
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and ntasks > 1:
        nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                    or env.get("SLURM_NODELIST") or "127.0.0.1")
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
        # A port derived from the job id avoids collisions between jobs on a
        # node (launch/slurm/train.sbatch exports the same one).
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return DistEnv(int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return DistEnv(0, 1, int(env.get("LOCAL_RANK", 0)), "127.0.0.1", 0, "single")


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# How long start-up waits for the slowest rank to join (rendezvous, then
# gloo/nccl connecting every pair of ranks), whatever the collective timeout:
# ranks reach it far apart on a loaded machine or a busy cluster (imports,
# DeepSpeed's op build under its file lock, a slow node).
CONNECT_TIMEOUT_S = 600


def init_distributed(timeout_s: int = 600, use_deepspeed: bool = True) -> DistEnv:
    """Start the process group for this process (no-op for a single process).

    ``timeout_s`` bounds every collective (how fast a dead or frozen peer is
    noticed); start-up waits up to ``max(timeout_s, CONNECT_TIMEOUT_S)`` for
    the other ranks.
    Exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* so that DeepSpeed and any
    library that reads the environment agree with what was discovered.
    """
    de = discover()
    if de.world_size == 1 and not use_deepspeed:
        return de
    os.environ.update(RANK=str(de.rank), WORLD_SIZE=str(de.world_size), LOCAL_RANK=str(de.local_rank),
                      MASTER_ADDR=de.master_addr, MASTER_PORT=str(de.master_port or _free_port()))
    if dist.is_initialized():
        return de
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(de.local_rank % torch.cuda.device_count())
    connect = datetime.timedelta(seconds=max(timeout_s, CONNECT_TIMEOUT_S))
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=connect)
        _unlink_shm_buffer(de.rank)
    else:
        dist.init_process_group(backend=backend, rank=de.rank, world_size=de.world_size, timeout=connect)
    # NCCL connects lazily, at the first collective: make every rank connect
    # now, under the long timeout. From here on a collective waits timeout_s.
    barrier()
    dist.set_timeout(datetime.timedelta(seconds=timeout_s))
    atexit.register(shutdown)
    return de


def shutdown() -> None:
    """End this process's process group, if any. :func:`init_distributed`
    registers it to run at exit: gloo's threads torn down by the
    interpreter's exit instead can abort a process whose work is done
    ("terminate called without an active exception", exit -6)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _unlink_shm_buffer(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm.

    DeepSpeed's shared-memory all-reduce (CPU) creates one /dev/shm segment of
    ~70 MB per rank and never unlinks it: every CPU job left its segments in
    RAM until reboot (21 GB after a day of test runs here). Once every rank has
    mapped every segment (DeepSpeed's init returns only then; the barrier makes
    sure all have), the names are no longer needed: the memory stays mapped
    and is freed when the ranks exit, however they exit.
    """
    if torch.cuda.is_available():
        return
    barrier()  # on every rank alike, whether or not it has a segment
    path = os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
                                    f"_{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(path)
    except OSError:  # none (CUDA, ranks on several hosts) or gone meanwhile
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def collective_device() -> torch.device:
    """Where a tensor must be for this process group's collectives: the
    current CUDA device under nccl (it reduces only CUDA tensors), the CPU
    under gloo or without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flags, op: str = "any") -> torch.Tensor:
    """Combine per-rank flags so that every rank takes the same decision.

    Args:
        flags: a bool/int tensor (any device, any shape) or a sequence of
            bools/ints; element-wise.
        op: 'any' (true where any rank's flag is) or 'all' (true where every
            rank's is).
    Returns: an int32 tensor of the flags' shape, on the device the flags'
        tensor was on (a sequence: the CPU). Collective; it makes the host
        wait only when the caller reads the result (``bool(...)``,
        ``.tolist()``), so a device-side decision stays asynchronous.
    """
    if op not in ("any", "all"):
        raise ValueError(f"agree: op must be 'any' or 'all', got {op!r}")
    home = flags.device if torch.is_tensor(flags) else torch.device("cpu")
    t = flags.to(torch.int32) if torch.is_tensor(flags) else torch.tensor(list(flags), dtype=torch.int32)
    if world_size() == 1:
        return t
    wire = collective_device()
    t = t.to(wire)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "any" else dist.ReduceOp.MIN)
    return t.to(home)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank the gradient of its slice.

    The gradient of the concatenation is summed over ranks (every rank's loss
    depends on every rank's features) and each rank receives its own rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x: (B, ...)
        ws = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)  # (ws*B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # grad: (ws*B, ...)
        # Sum over ranks, keep this rank's rows: a reduce-scatter moves half
        # the bytes of an all-reduce followed by slicing.
        out = torch.empty((ctx.batch, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        # torch 2.14 renamed reduce_scatter_tensor (now deprecated, with a warning per call site).
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(out, grad.contiguous())
        return out  # (B, ...)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world*B, ...) in rank order, differentiable.

    Every rank must pass the same B.
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world*B, ...) in rank order, no gradient."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


@torch.no_grad()
def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Make parameters and buffers identical to rank src's (DeepSpeed does not
    broadcast buffers, and momentum towers live outside the engine)."""
    if world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def broadcast_object(obj):
    """Rank 0's small Python object (e.g. a list of paths) on every rank.

    Pickled between the job's own ranks only; never used on loaded data.
    """
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
