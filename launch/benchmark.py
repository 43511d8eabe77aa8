#!/usr/bin/env python
"""Benchmark of the training step, the data pipeline, evaluation and communication.

    python launch/benchmark.py --preset tiny --steps 5                 # seconds on a CPU
    python launch/benchmark.py --preset paper --batch 8 --steps 2      # BERT-base, about a minute on a CPU
    python launch/benchmark.py --preset paper --reference ../shared/gpu/bench_reference.py   # on a GPU
    python launch/benchmark.py --preset tiny --sections dist           # 2 gloo ranks: bytes per step
    python launch/benchmark.py --sections train,data,eval,dist queue.size_per_rank=2048

Sections (``--sections``, comma separated; each in a module of launch/bench/):

- ``train`` (step.py): the training step of launch/train.py (DeepSpeed
  engine, fp32 momentum towers, queues, UTO: ``TrainStep.micro_step``
  itself) on synthetic in-memory batches (random regions, random token ids
  of COCO-like caption lengths). Prints ms/step (median after warm-up),
  samples/s per process, peak memory, TFLOP/s and MFU from the analytic
  count of user_dist.flops, and where the step goes (phases.py: each of
  ``TrainStep.PHASES`` bracketed by device syncs, through the step's own
  ``clock``). ``--reference PATH`` (reference.py) also runs
  /work/shared/gpu/bench_reference.py's step in this process (same batch,
  regions, caption lengths and queue) and prints the ratio;
  ``--batch-sweep`` (sweep.py), ``--profile`` and ``--sync-debug``
  (diagnose.py) add their tables.
- ``data`` (data.py): samples/s per loader worker.
- ``eval`` (evaluation.py): encode 5,000 images + 25,000 captions and score them.
- ``dist`` (dist_section.py): 2 gloo ranks on this machine (CPU),
  ``queue.mode`` replicated vs sharded: step time, bytes communicated per
  step per rank (every collective counted at the dispatcher, comm.py)
  against the bytes the code declares (``comm.declared``), and the queue
  memory per rank against one process.
- ``project`` (projection.py): samples/s per GPU at 8-512 GPUs from a
  compute time and the declared bytes.

Any ``key=value`` overrides the preset's config (``--list-keys`` in launch/train.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from launch.bench.common import PRESETS, build_config  # noqa: E402
from launch.bench.data import data_section  # noqa: E402
from launch.bench.dist_section import dist_section, dist_worker  # noqa: E402
from launch.bench.evaluation import eval_section  # noqa: E402
from launch.bench.projection import print_projection, project  # noqa: E402
from launch.bench.reference import print_reference, reference_section  # noqa: E402
from launch.bench.step import print_train, train_section  # noqa: E402
from launch.bench.sweep import batch_sweep  # noqa: E402
from user_dist import distributed as du  # noqa: E402
from user_dist.atomic import atomic_json  # noqa: E402

SECTIONS = ("train", "data", "eval", "dist", "project")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="", help="default: the preset's")
    p.add_argument("--batch", type=int, default=0, help="samples per process (default: the preset's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="the chip's peak for MFU (H100/H200 bf16 dense, as ../shared/gpu/README.md uses)")
    p.add_argument("--regions", type=int, default=36, help="region slots per image (all real)")
    p.add_argument("--caption-len", default="12-20",
                   help="tokens per caption with [CLS]/[SEP], uniform MIN-MAX (COCO: ~12-20; the reference: 28-32)")
    p.add_argument("--breakdown-steps", type=int, default=3, help="synced steps timed phase by phase (0: none)")
    p.add_argument("--sync-debug", action="store_true",
                   help="list where one step makes the host wait for the device (CUDA)")
    p.add_argument("--profile", default="", help="write a torch.profiler table of --profile-steps steps here")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--batch-sweep", default="",
                   help="comma-separated per-process batch sizes to time after the train section, up to the first "
                        "that runs out of memory")
    p.add_argument("--sweep-steps", type=int, default=10, help="timed steps per --batch-sweep size")
    p.add_argument("--reference", default="", help="path of bench_reference.py: run its step too and compare")
    p.add_argument("--reference-variants", default="reference",
                   help="comma-separated variants of bench_reference.py (reference, tf32, bf16, bf16_compile, ...)")
    p.add_argument("--sections", default="train", help="comma-separated: " + ", ".join(SECTIONS))
    p.add_argument("--compute-ms", type=float, default=0.0,
                   help="project: compute time per step (default: the train section's ms/step)")
    p.add_argument("--worlds", default="8,64,512", help="project: GPU counts")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nic-gbit", type=float, default=400.0, help="project: inter-node bandwidth per node, Gb/s")
    p.add_argument("--nvlink-gbyte", type=float, default=360.0,
                   help="project: intra-node bandwidth per GPU, GB/s (NCCL bus bandwidth on H100 NVLink)")
    p.add_argument("--data-images", type=int, default=200, help="images per data fixture")
    p.add_argument("--data-seconds", type=float, default=3.0, help="seconds per data measurement")
    p.add_argument("--eval-batch", type=int, default=32, help="images per encoding batch (5x captions)")
    p.add_argument("--eval-images", type=int, default=5000,
                   help="images of the eval section (5 captions each; coco5k/coco1k need 5000)")
    p.add_argument("--dist-timeout", type=float, default=600.0, help="seconds before the dist ranks are killed")
    p.add_argument("--json", default="", help="write every result here too (default: $OUT/benchmark.json if $OUT)")
    p.add_argument("--dist-worker", default="", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {', '.join(sorted(unknown))}; valid: {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(du.strip_local_rank_arg(sys.argv[1:] if argv is None else list(argv)))
    if args.device == "cpu":  # before anything initialises CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.dist_worker:
        dist_worker(args)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sections = args.sections.split(",")
    results: Dict[str, object] = {"argv": sys.argv[1:] if argv is None else list(argv)}
    cfg = build_config(args.preset, args.overrides, args.precision, args.batch)
    if "train" in sections:
        du.init_distributed(cfg.train.dist_timeout_s)  # world 1, as launch/train.py does
        r = train_section(cfg, args)
        print_train(r, args)
        results["train"] = r
        if args.reference:
            rows = reference_section(args.reference, cfg, args, r)
            print_reference(rows, r)
            results["reference"] = rows
        if args.batch_sweep:
            results["batch_sweep"] = batch_sweep(
                lambda b: build_config(args.preset, args.overrides, args.precision, b),
                [int(b) for b in args.batch_sweep.split(",")], args)
    if "data" in sections:
        results["data"] = data_section(args)
    if "eval" in sections:
        results["eval"] = eval_section(args.preset, args.overrides, args)
    if "dist" in sections:
        results["dist"] = dist_section(args)
    if "project" in sections:
        compute_ms = args.compute_ms or results.get("train", {}).get("ms_per_step", 0.0)
        if not compute_ms:
            raise SystemExit("--sections project needs --compute-ms or the train section")
        rows = project(cfg, compute_ms, [int(w) for w in args.worlds.split(",")], args.gpus_per_node,
                       args.nic_gbit, args.nvlink_gbyte)
        print_projection(rows, compute_ms, args)
        results["project"] = rows
    path = args.json or (os.path.join(os.environ["OUT"], "benchmark.json") if os.environ.get("OUT") else "")
    if path:
        atomic_json(path, results, default=str)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
