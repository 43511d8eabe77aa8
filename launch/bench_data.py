#!/usr/bin/env python
"""Data-loader throughput per loader worker: launch/bench/data.py (its
docstring and ``--help`` say what is measured).

    python launch/bench_data.py                       # builds temporary shards first
    python launch/bench_data.py --regions DIR --jpg DIR --seconds 20
    python launch/bench_data.py --web --web-images 500 --seconds 4   # web-style JPEG decoders
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from launch.bench.data import main  # noqa: E402

if __name__ == "__main__":
    main()
