#!/usr/bin/env python
"""Memory of the training step: peak memory per sample with and without
train.grad_checkpointing (or any variants), and the largest per-process batch
under a memory cap, each measurement a fresh process running real steps
(launch/bench/memory.py; its docstring and ``--help`` say how).

    python launch/bench_memory.py per-sample --preset tiny --batches 16,64
    python launch/bench_memory.py per-sample --preset paper --precision fp32 --batches 2,6 data.mode=jpg
    python launch/bench_memory.py largest --preset paper --precision fp32 --cap-gb 6 data.mode=jpg
    python launch/bench_memory.py per-sample --micro-batch 8 --batches 16,48 \
        --variant cached=train.accum_mode=cached ...      # accumulated batches, cached_step
    python launch/bench_memory.py largest --cap-gb 6 --micro-batch 8 --variant cached=train.accum_mode=cached ...
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from launch.bench.memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
