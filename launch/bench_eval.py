#!/usr/bin/env python
"""Benchmark of the evaluation job, scoring and encoding: launch/bench/evaluation.py
(its docstring and ``--help`` say what is measured).

    python launch/bench_eval.py                    # scoring + tiny towers
    python launch/bench_eval.py --paper            # + the paper-size towers (BERT-base, 36x2048 regions)
    python launch/bench_eval.py --skip-encoding    # scoring only (no model needed)
    python launch/bench_eval.py --skip-encoding --scoring-device cuda   # scoring a tensor on the GPU
    python launch/bench_eval.py --coco5k --batch 128   # the whole COCO 5K evaluation, paper towers
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from launch.bench.evaluation import TINY, bench_coco5k, main  # noqa: E402

__all__ = ["TINY", "bench_coco5k", "main"]  # tests/test_evaluate_cli.py loads this file for the first two

if __name__ == "__main__":
    sys.exit(main())
