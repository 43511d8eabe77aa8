"""The ``dist`` section: 2 gloo ranks of launch/benchmark.py on this machine
(CPU), ``queue.mode`` replicated and sharded: step time, the bytes each rank
communicates per micro-step (counted, :mod:`bench.comm`) against the bytes
the code declares, and the queue's memory per rank against one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

import torch

from user_dist.config import Config

from . import ROOT
from .comm import by_phase, declared, ring_wire_bytes, sync_norm_widths
from .common import build_config, caption_lengths, nbytes, synthetic_batch
from .phases import breakdown
from .step import build_step, run_step

SCRIPT = os.path.join(ROOT, "launch", "benchmark.py")


def dist_worker(args) -> None:
    """One rank of the dist section: both queue modes, results as JSON (rank 0)."""
    import torch.distributed as dist

    from user_dist import distributed as du

    torch.set_num_threads(1)
    du.init_distributed(timeout_s=300)
    results = {}
    for mode in ("replicated", "sharded"):
        cfg = build_config(args.preset, list(args.overrides) + [f"queue.mode={mode}"], args.precision, args.batch)
        step = build_step(cfg)
        lengths = caption_lengths(args.caption_len)
        batches = [synthetic_batch(cfg, cfg.train.batch_size, args.regions, lengths, seed=s + 100 * du.rank())
                   for s in range(4)]
        for i in range(args.warmup):
            run_step(step, batches[i % len(batches)])
        b = breakdown(step, batches, args.steps)
        q = step.queue
        params = [p for p in step.engine.module.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in params)
        formula = declared(cfg, du.world_size(), n_params, sync_norm_widths(step.engine.module),
                           params[0].element_size())
        results[mode] = {
            "ms_per_step": b["total"] * 1e3, "comm_ms_per_step": b["comm_seconds"] * 1e3,
            "bytes_per_step": b["comm_bytes"], "calls_per_step": b["comm_calls"],
            "formula": {c.what: c.nbytes for c in formula}, "formula_by_phase": by_phase(formula),
            "pool_size": q.pool_size, "queue_bytes_per_rank": sum(nbytes(t) for t in (q.image, q.text, q.ids)),
            "n_params": n_params, "batch": cfg.train.batch_size, "embed": cfg.model.embed_size,
            "size_per_rank": cfg.queue.size_per_rank,
        }
        del step
    if du.rank() == 0:
        with open(args.dist_worker, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def queue_bytes_one_process(cfg: Config) -> int:
    """Queue tensor bytes of one process (world 1): the baseline of the dist comparison."""
    from user_dist.queue import NegativeQueues

    q = NegativeQueues(cfg.queue, cfg.model.embed_size, "cpu")
    return sum(nbytes(t) for t in (q.image, q.text, q.ids))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _common_argv(args) -> List[str]:
    argv = ["--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--caption-len", args.caption_len, "--regions", str(args.regions)]
    argv += ["--precision", args.precision] if args.precision else []
    argv += ["--batch", str(args.batch)] if args.batch else []
    return argv + list(args.overrides)


def run_ranks(args, world: int) -> Dict[str, dict]:
    """``world`` ranks of launch/benchmark.py --dist-worker on the CPU
    (torchrun-style environment); rank 0's results."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "dist.json")
        cmd = [sys.executable, SCRIPT, "--dist-worker", out] + _common_argv(args)
        procs = []
        for r in range(world):
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                       PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
            procs.append(subprocess.Popen(cmd, env=env))
        try:
            codes = [p.wait(timeout=args.dist_timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(codes) or not os.path.isfile(out):
            raise SystemExit(f"--sections dist: a rank failed (exit codes {codes}); its traceback is above")
        with open(out) as f:
            return json.load(f)


def dist_section(args, world: int = 2) -> Dict[str, object]:
    """Both queue modes at ``world`` gloo ranks; measured bytes against the formula."""
    if build_config(args.preset, args.overrides, args.precision, args.batch).train.compile != "none":
        raise SystemExit("--sections dist counts the collectives of eager steps (torch.compile does not run "
                         "under the counter): drop the train.compile override")
    results = run_ranks(args, world)
    for mode, r in results.items():
        cfg = build_config(args.preset, list(args.overrides) + [f"queue.mode={mode}"], args.precision, args.batch)
        r["queue_bytes_one_process"] = queue_bytes_one_process(cfg)
        r["measured_total"] = sum(r["bytes_per_step"].values())
        r["formula_total"] = sum(r["formula"].values())
        r["ring_wire_bytes"] = int(ring_wire_bytes(
            ((key.split(": ")[1], n) for key, n in r["bytes_per_step"].items()), world))
    print(f"\n== {world} gloo ranks (CPU), bytes per micro-step per rank (payload; all-gather = gathered output) ==")
    print("| queue.mode | ms/step | measured bytes | formula bytes | ring wire bytes sent | pool | "
          "queue bytes/rank (W=2) | queue bytes (W=1) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['ms_per_step']:.1f} | {r['measured_total']:,} | {r['formula_total']:,} | "
              f"{r['ring_wire_bytes']:,} | {r['pool_size']} | {r['queue_bytes_per_rank']:,} | "
              f"{r['queue_bytes_one_process']:,} |")
    for mode, r in results.items():
        print(f"\n{mode}, per phase: collective -> measured bytes / formula bytes (calls):")
        measured, formula = r["bytes_per_step"], r["formula_by_phase"]
        for key in sorted(set(measured) | set(formula)):
            got, want = measured.get(key, 0), formula.get(key, 0)
            print(f"  {key}: {got:,} / {want:,} ({r['calls_per_step'].get(key, 0):g})"
                  + ("" if got == want else "  <- differs"))
        print(f"{mode}, formula: " + "; ".join(f"{k}: {v:,}" for k, v in r["formula"].items()))
    return results
