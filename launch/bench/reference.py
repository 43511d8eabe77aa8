"""``--reference``: bench_reference.py's training step run in this process
at our batch, regions, caption lengths and queue, and ours against it."""
from __future__ import annotations

import argparse
import importlib.util
import os
import types
from typing import Dict, List

import torch

from user_dist.config import Config

from .common import caption_lengths


def load_reference(path: str) -> types.ModuleType:
    """bench_reference.py imported as a module from its path."""
    if not os.path.isfile(path):
        raise SystemExit(f"--reference {path}: no such file (the baseline is /work/shared/gpu/bench_reference.py; "
                         "copy it into the checkout to run on the GPU machine)")
    spec = importlib.util.spec_from_file_location("bench_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_section(path: str, cfg: Config, args, ours: Dict[str, object]) -> List[Dict[str, object]]:
    """Run the reference's training step (its ``run_variant``) for each of
    ``--reference-variants``; return its result rows."""
    ref = load_reference(path)
    tiny = cfg.model.text.num_layers < 12
    ns = argparse.Namespace(tiny=tiny, batch=cfg.train.batch_size, queue=cfg.queue.size_per_rank,
                            n_eval_img=None, seed=0, steps=args.steps, warmup=args.warmup,
                            compile_warmup=max(args.warmup, 3), max_variant_s=60.0,
                            peak_bf16=args.peak_tflops, peak_tf32=args.peak_tflops / 2, peak_fp32=args.peak_tflops / 12)
    d = ref.make_dims(ns)
    lengths = caption_lengths(args.caption_len)
    # Same caption lengths as ours: make_text draws L - U{0..pad_max}.
    d.update(R=args.regions, L=lengths.stop - 1, pad_max=lengths.stop - 1 - lengths.start)
    if not tiny:
        d.update(img_dim=cfg.model.region_dim, embed=cfg.model.embed_size, mlp_hidden=cfg.model.mlp_hidden)
    fl = ref.flop_model(d)
    device = torch.device(ours["device_type"])
    return [ref.run_variant(variant, ns, d, device, fl) for variant in args.reference_variants.split(",")]


def print_reference(rows: List[Dict[str, object]], ours: Dict[str, object]) -> None:
    print("\n== reference (bench_reference.py) in the same process, same sizes ==")
    print("| variant | ms/step | samples/s | ours / reference (samples/s) |\n|---|---|---|---|")
    for r in rows:
        if r.get("status") == "error":
            print(f"| {r['variant']} | error: {r.get('error', '')[:100]} | | |")
            continue
        print(f"| {r['variant']} | {r['median_step_ms']:.1f} | {r['samples_per_s']:.1f} | "
              f"{ours['samples_per_s'] / r['samples_per_s']:.2f}x |")
