"""``--batch-sweep``: the training step at several per-process batch sizes,
up to the first that does not fit in the device's memory."""
from __future__ import annotations

import gc
from typing import Callable, Dict, List, Sequence

import torch

from user_dist.config import Config

from .step import build_step, loaded_batches, speed, timed_steps


def batch_sweep(cfg_for: Callable[[int], Config], sizes: Sequence[int], args) -> List[Dict[str, object]]:
    """ms/step, samples/s, peak memory and MFU at each batch size (the config
    of ``cfg_for(size)``), up to the first that runs out of CUDA memory."""
    rows = []
    for B in sizes:
        gc.collect()  # the engines of earlier sections hold device memory until collected
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        cfg = cfg_for(B)
        step = None
        try:
            step = build_step(cfg)
            batches = loaded_batches(cfg, args, 2)
            if step.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(step.device)
            r = speed(cfg, step, batches, timed_steps(step, batches, args.sweep_steps, 2), args)
            rows.append({k: r[k] for k in ("batch", "ms_per_step", "samples_per_s", "peak_memory_gb", "tflops",
                                           "mfu", "queue_pool")})
        except torch.OutOfMemoryError as exc:
            rows.append({"batch": B, "error": f"out of memory: {str(exc)[:120]}"})
            break
        finally:
            del step
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print("\n== batch sweep (per process) ==")
    print("| batch | ms/step | samples/s | peak mem GB | TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['error']} | | | | |")
        else:
            print(f"| {r['batch']} | {r['ms_per_step']:.1f} | {r['samples_per_s']:,.0f} | {r['peak_memory_gb']:.1f} | "
                  f"{r['tflops']:.1f} | {100 * r['mfu']:.2f}% |")
    return rows
