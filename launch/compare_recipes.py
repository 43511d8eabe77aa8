#!/usr/bin/env python
"""Train and evaluate several recipes over several seeds; print COCO-1K rsum
as mean and spread per recipe (the evidence tables of docs/model.md).

    python launch/compare_recipes.py --out runs/evidence --seeds 0 1 2 \\
        --arm "1x128|1|" --arm "2x64|2|" --arm "2x64-grouped|2|data.caption_order=grouped" \\
        [--base-config configs/synthetic.yaml] [key=value ...]

An arm is ``NAME|RANKS|key=value key=value ...``. Every run trains with
torchrun on RANKS CPU or GPU processes from the base config, with the
trailing key=value overrides, the arm's overrides and ``train.seed=SEED``;
then the evaluation job scores its last checkpoint (COCO 1K on the base
config's test split). The base config's per-rank sizes
(``train.batch_size``, ``queue.size_per_rank``) are replaced by the global
ones they mean on the base config's 2 ranks, so that every arm states the
same global recipe unless it says otherwise. A finished run (its metrics
present) is not run again, so an interrupted comparison continues.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def global_base(base_config: str, out: str, base_ranks: int = 2) -> str:
    """The base config with its per-rank sizes restated globally for ``base_ranks`` ranks."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(base_config)
    train, queue = cfg.get("train", {}), cfg.get("queue", {})
    if "batch_size" in train:
        train["global_batch_size"] = train.pop("batch_size") * base_ranks * train.get("grad_accum", 1)
    if "size_per_rank" in queue:
        queue["global_size"] = queue.pop("size_per_rank") * base_ranks
    path = os.path.join(out, "base.yaml")
    OmegaConf.save(cfg, path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(name: str, ranks: int, overrides: List[str], seed: int, base: str, out: str) -> Dict[str, float]:
    """Train and evaluate one arm at one seed; returns {'rsum': ..., 'train_s': ...}."""
    run_name = f"{name}_s{seed}"
    result = os.path.join(out, run_name, "result.json")
    if os.path.isfile(result):
        with open(result) as f:
            return json.load(f)
    # One thread per rank on a small machine, or the ranks fight for the cores.
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)))
    start = time.time()
    train = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
             str(_free_port()), os.path.join(ROOT, "launch", "train.py"), "--config", base,
             f"train.run_root={out}", f"train.run_name={run_name}", "train.resume=auto", f"train.seed={seed}",
             *overrides]
    log = os.path.join(out, f"{run_name}.log")
    with open(log, "w") as f:
        if subprocess.run(train, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
            raise SystemExit(f"{run_name}: training failed, see {log}")
    train_s = time.time() - start
    ckpt_root = os.path.join(out, run_name, "checkpoints")
    with open(os.path.join(ckpt_root, "latest")) as f:
        latest = os.path.join(ckpt_root, f.read().strip())
    evaluate = [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--checkpoint", latest,
                "eval.protocols=[coco1k]"]
    with open(log, "a") as f:
        if subprocess.run(evaluate, env=dict(env, OMP_NUM_THREADS="2"), stdout=f, stderr=subprocess.STDOUT,
                          cwd=ROOT).returncode:
            raise SystemExit(f"{run_name}: evaluation failed, see {log}")
    with open(os.path.join(out, run_name, "eval", os.path.basename(latest), "metrics.json")) as f:
        metrics = json.load(f)
    got = {"rsum": float(metrics["coco1k"]["rsum"]), "train_s": train_s}
    with open(result, "w") as f:
        json.dump(got, f)
    return got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder of the runs (one sub-folder per arm and seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arm", action="append", required=True, metavar="NAME|RANKS|OVERRIDES")
    p.add_argument("--base-config", default=os.path.join(ROOT, "configs", "synthetic.yaml"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="for every arm")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    base = global_base(args.base_config, args.out)
    rows = []
    for spec in args.arm:
        name, ranks, arm_overrides = (spec.split("|") + ["", ""])[:3]
        results = [run_arm(name, int(ranks), args.overrides + arm_overrides.split(), seed, base, args.out)
                   for seed in args.seeds]
        rsums = [r["rsum"] for r in results]
        rows.append((name, ranks, arm_overrides, rsums, statistics.mean(r["train_s"] for r in results)))
        print(f"{name}: rsum {rsums}", flush=True)
    print("\n| arm | ranks | overrides | COCO-1K rsum per seed | mean | spread (max - min) | train s |")
    print("|---|---|---|---|---|---|---|")
    for name, ranks, ov, rsums, secs in rows:
        print(f"| {name} | {ranks} | `{ov or '-'}` | {', '.join(f'{r:.1f}' for r in rsums)} | "
              f"{statistics.mean(rsums):.1f} | {max(rsums) - min(rsums):.1f} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
