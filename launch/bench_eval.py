#!/usr/bin/env python
"""Benchmark of the evaluation job: scoring time and encoding throughput.

    python launch/bench_eval.py                    # scoring + tiny towers
    python launch/bench_eval.py --paper            # + the paper-size towers (BERT-base, 36x2048 regions)
    python launch/bench_eval.py --skip-encoding    # scoring only (no model needed)

Scoring: seconds to score a random 5,000 x 25,000 matrix (the COCO 5K test
split) with each protocol that fits it (coco5k, coco1k, generic; f30k on a
1,000 x 5,000 one), best of --repeat runs, one thread per --threads.
Encoding: images/s and captions/s of encode_image / encode_text with random
init on random region features and token ids (regions mode), with the
precision the job uses (bf16 on CUDA, fp32 on CPU). Figures go to
docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from user_dist.evaluation.metrics import evaluate  # noqa: E402

TINY = ["model.embed_size=64", "model.region_dim=64", "model.mlp_hidden=32", "model.gpo_pe_dim=16",
        "model.gpo_hidden=16", "model.text.hidden_size=64", "model.text.num_layers=2", "model.text.num_heads=2",
        "model.text.intermediate_size=128"]


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_scoring(repeat: int) -> list:
    rng = np.random.default_rng(0)
    big = rng.standard_normal((5000, 25000), dtype=np.float32)
    small = rng.standard_normal((1000, 5000), dtype=np.float32)
    rows = [(p, "5000 x 25000", best_of(lambda p=p: evaluate(big, p), repeat)) for p in ("coco5k", "coco1k", "generic")]
    rows.append(("f30k", "1000 x 5000", best_of(lambda: evaluate(small, "f30k"), repeat)))
    rows.append(("coco5k+coco1k", "5000 x 25000", best_of(lambda: [evaluate(big, p) for p in ("coco5k", "coco1k")],
                                                           repeat)))
    return rows


def bench_encoding(name: str, overrides: list, batch: int, batches: int, text_len: int) -> tuple:
    import torch

    from user_dist.config import load_config
    from user_dist.distributed import device_for
    from user_dist.models import build_model

    cfg = load_config(None, overrides)
    device = device_for(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg.model, "regions").to(device).eval()
    g = torch.Generator().manual_seed(0)
    data = {"regions": torch.randn(batch, 36, cfg.model.region_dim, generator=g).to(device),
            "region_mask": torch.ones(batch, 36, dtype=torch.bool, device=device),
            "input_ids": torch.randint(1000, cfg.model.text.vocab_size, (5 * batch, text_len), generator=g).to(device),
            "attention_mask": torch.ones(5 * batch, text_len, dtype=torch.long, device=device)}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run(fn) -> float:
        with torch.no_grad(), autocast:
            fn(data)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(batches):
                fn(data)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - start

    img_s = batches * batch / run(model.encode_image)
    cap_s = batches * 5 * batch / run(model.encode_text)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return name, str(device), f"{params:.1f}M", batch, img_s, cap_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Benchmark scoring and encoding of the evaluation job.")
    p.add_argument("--repeat", type=int, default=3, help="scoring runs; the best is reported")
    p.add_argument("--threads", type=int, default=1, help="torch/BLAS threads for encoding")
    p.add_argument("--paper", action="store_true", help="also time the paper-size towers (slow on a CPU)")
    p.add_argument("--skip-encoding", action="store_true", help="scoring only")
    p.add_argument("--batch", type=int, default=32, help="images per encoding batch (5x captions)")
    p.add_argument("--batches", type=int, default=3, help="timed encoding batches")
    args = p.parse_args(argv)

    print("scoring (exact ranks, pessimistic ties; numpy, one thread)")
    print(f"{'protocol':>14}  {'matrix':>12}  {'seconds':>8}")
    for protocol, shape, seconds in bench_scoring(args.repeat):
        print(f"{protocol:>14}  {shape:>12}  {seconds:8.3f}")
    if args.skip_encoding:
        return 0
    import torch

    torch.set_num_threads(args.threads)
    towers = [("tiny", TINY)] + ([("paper", [])] if args.paper else [])
    print("\nencoding (random init, regions 36 x region_dim, captions of 32 tokens)")
    print(f"{'towers':>8}  {'device':>8}  {'params':>8}  {'batch':>5}  {'images/s':>10}  {'captions/s':>10}")
    for name, overrides in towers:
        name, device, params, batch, img_s, cap_s = bench_encoding(name, overrides, args.batch, args.batches, 32)
        print(f"{name:>8}  {device:>8}  {params:>8}  {batch:>5}  {img_s:10.1f}  {cap_s:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
