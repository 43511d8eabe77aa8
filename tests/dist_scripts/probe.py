"""Launcher probe: start the process group the way training does, check two
collectives, and append one JSON line per rank to ``--out``.

    <launcher> tests/dist_scripts/probe.py --out FILE [--linger S] [--signal-exit]

Each line holds rank, world, local_rank, launcher, backend, master_addr, the
pid, argv, network namespace, a few SLURM facts and ``result`` (the
all_reduce sum, and whether all_gather_with_grad gave the right values and
gradients).

``--linger S`` keeps every rank doing an all_reduce every 0.1 s for S seconds
after the checks (or until ``--stop-file`` exists), like a training loop, so a
test can kill one rank and watch how the others fail: a rank whose collective
raises appends ``{"rank": R, "error": "..."}`` and exits 1. ``--signal-exit``
makes SIGUSR1 / SIGTERM end the linger loop cleanly (exit 0, ``"signal":
"SIGUSR1"``), the way the training job answers a preemption signal. Unknown arguments are accepted
and recorded, so the probe can stand in for launch/train.py and
launch/evaluate.py in the sbatch scripts (USER_DIST_ENTRY).
"""
import argparse
import json
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

from user_dist.distributed import all_gather_with_grad, device_for, init_distributed, strip_local_rank_arg

ROWS, COLS = 2, 3  # rows per rank of the all_gather check


def _append(path: str, record: dict) -> None:
    # One write of one line: O_APPEND keeps concurrent ranks' lines whole.
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _check_collectives(rank: int, world: int, device: torch.device) -> dict:
    """all_reduce of rank+1, and all_gather_with_grad against a float64 reference."""
    s = torch.tensor([float(rank + 1)], dtype=torch.float64, device=device)
    dist.all_reduce(s)

    x = torch.full((ROWS, COLS), float(rank + 1), dtype=torch.float64, device=device, requires_grad=True)
    gathered = all_gather_with_grad(x).cpu()  # (world*ROWS, COLS)
    expect = torch.cat([torch.full((ROWS, COLS), float(r + 1), dtype=torch.float64) for r in range(world)])
    # The same weighted loss on every rank: d(sum over ranks of loss)/dx is
    # world * the weights of this rank's rows.
    w = torch.arange(world * ROWS * COLS, dtype=torch.float64).reshape(world * ROWS, COLS)
    (gathered * w).sum().backward()
    expect_grad = world * w[rank * ROWS:(rank + 1) * ROWS]
    return {
        "all_reduce": s.item(),
        "all_reduce_ok": s.item() == world * (world + 1) / 2,
        "gather_ok": bool(torch.equal(gathered.detach(), expect)),
        "grad_ok": bool(torch.equal(x.grad.cpu(), expect_grad)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="file to append this rank's JSON line to")
    parser.add_argument("--timeout", type=int, default=300, help="process-group timeout (s)")
    parser.add_argument("--no-deepspeed", action="store_true", help="start the group with torch only")
    parser.add_argument("--linger", type=float, default=0.0, help="keep doing collectives for S seconds")
    parser.add_argument("--stop-file", help="end the linger loop early once this file exists")
    parser.add_argument("--signal-exit", action="store_true", help="SIGUSR1/SIGTERM end the linger loop, exit 0")
    argv = strip_local_rank_arg(sys.argv[1:])
    args, extra = parser.parse_known_args(argv)

    caught = []
    if args.signal_exit:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: caught.append(signal.Signals(signum).name))

    de = init_distributed(timeout_s=args.timeout, use_deepspeed=not args.no_deepspeed)
    record = {
        "rank": de.rank, "world": de.world_size, "local_rank": de.local_rank, "launcher": de.launcher,
        "master_addr": de.master_addr, "master_port": de.master_port,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "hostname": socket.gethostname(), "pid": os.getpid(), "argv": argv, "extra_args": extra,
        "netns": os.stat("/proc/self/ns/net").st_ino,  # which network namespace ("host") it ran in
        "slurm": {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURMD_NODENAME", "SLURM_RESTART_COUNT")},
        "env": {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME",)},
    }
    device = device_for(de.local_rank)
    record["result"] = _check_collectives(de.rank, de.world_size, device) if dist.is_initialized() else None
    _append(args.out, record)

    t_end = time.monotonic() + args.linger
    try:
        while time.monotonic() < t_end and not caught and not (args.stop_file and os.path.exists(args.stop_file)):
            dist.all_reduce(torch.ones(1, device=device))
            time.sleep(0.1)
    except Exception as e:  # a dead or frozen peer: report what this rank saw
        _append(args.out, {"rank": de.rank, "error": f"{type(e).__name__}: {e}"})
        return 1
    if caught:
        _append(args.out, {"rank": de.rank, "signal": caught[0]})
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
