#!/usr/bin/env python
"""What cached accumulation costs: ms per optimiser step and per phase of
``TrainStep.PHASES``, ``train.accum_mode=plain`` against ``cached``, the
same batches, one process (docs/training.md, "Cached gradient accumulation").

    python launch/bench_accum.py                                  # tiny preset, fp32, 32 x 4, on a CPU
    python launch/bench_accum.py --preset paper --precision bf16 --batch 128 --accum 4   # on a GPU

Phases are summed over the step (plain: over its micro-steps; cached: the
recomputed forward counts under ``backward``) and averaged over the timed
steps; the first step is a warm-up. Any ``key=value`` overrides the config.
"""
import argparse
import collections
import contextlib
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from launch.bench.common import build_config, sync, synthetic_batch  # noqa: E402
from user_dist import distributed as du  # noqa: E402
from user_dist.train_step import TrainStep  # noqa: E402


def measure(cfg, steps: int, regions: int) -> tuple:
    """(median ms per optimiser step, {phase: mean ms per step})."""
    step = TrainStep(cfg, steps + 1, steps + 1)
    k, b = cfg.train.grad_accum, cfg.train.batch_size
    batches = [synthetic_batch(cfg, b, regions, range(8, 20), seed=s) for s in range(k * (steps + 1))]
    seconds = collections.defaultdict(float)

    @contextlib.contextmanager
    def clock(name):
        sync(step.device)
        start = time.perf_counter()
        yield
        sync(step.device)
        seconds[name] += time.perf_counter() - start

    totals = []
    for n in range(steps + 1):
        if n == 1:  # after the warm-up
            seconds.clear()
            step.clock = clock
        window = batches[n * k:(n + 1) * k]
        sync(step.device)
        start = time.perf_counter()
        if step.cached:
            step.cached_step(window, step=n)
        else:
            for batch in window:
                step.micro_step(batch, step=n)
        sync(step.device)
        totals.append(time.perf_counter() - start)
    return 1e3 * statistics.median(totals[1:]), {p: 1e3 * s / steps for p, s in seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=("tiny", "paper"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--batch", type=int, default=32, help="train.batch_size: pairs per micro-batch")
    ap.add_argument("--accum", type=int, default=4, help="train.grad_accum: micro-batches per optimiser step")
    ap.add_argument("--steps", type=int, default=5, help="timed optimiser steps (after one warm-up)")
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()
    if args.accum < 2:
        ap.error("--accum must be at least 2: with one micro-batch both modes run the same step")
    du.init_distributed(timeout_s=120)
    rows = []
    for mode in ("plain", "cached"):
        cfg = build_config(args.preset, [f"train.batch_size={args.batch}", f"train.grad_accum={args.accum}",
                                         f"train.accum_mode={mode}",
                                         f"queue.size_per_rank={max(4096, args.batch * args.accum)}"]
                           + args.overrides, args.precision)
        rows.append((mode, *measure(cfg, args.steps, args.regions)))
    device = "CPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    print(f"\n{args.preset} preset, {args.precision}, batch {args.batch} x grad_accum {args.accum}, {device} "
          f"({torch.get_num_threads()} threads), median of {args.steps} steps; phases in ms per optimiser step\n")
    print("| accum_mode | ms/step | vs plain | " + " | ".join(TrainStep.PHASES) + " |")
    print("|---|---|---|" + "---|" * len(TrainStep.PHASES))
    for mode, ms, phases in rows:
        print(f"| {mode} | {ms:.1f} | {ms / rows[0][1]:.2f}x | "
              + " | ".join(f"{phases.get(p, 0.0):.1f}" for p in TrainStep.PHASES) + " |")


if __name__ == "__main__":
    main()
