"""The ``train`` section: launch/train.py's training step
(``user_dist.train_step.TrainStep``) timed on synthetic batches, with its
FLOPs, MFU and peak memory, and the table that prints them."""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence

import torch

from user_dist import distributed as du
from user_dist.config import Config
from user_dist.flops import StepShape, count

from .common import as_loaded, caption_lengths, device_name, peak_memory_gb, synthetic_batch, sync

NONFINITE = ("non-finite loss in the benchmark step (random data, random init): "
             "try train.precision=fp32 or another --seed")


def build_step(cfg: Config):
    """launch/train.py's step (engine, key towers, queues, loss), without
    data stream, run folder or monitor."""
    from user_dist.train_step import TrainStep

    return TrainStep(cfg, steps_per_epoch=10 ** 6, total_steps=10 ** 6)


def run_step(step, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``step.micro_step(batch)``: the step launch/train.py runs (here at
    step 0 and without the gradient norm that log steps add); a
    micro-batch dropped for a non-finite loss (checked on the host: ZeRO 1-2,
    fp16) is not a step to time."""
    out = step.micro_step(batch)
    if out is None:
        raise FloatingPointError(NONFINITE)
    return out


def check_no_skips(step) -> None:
    """Raise if a step was skipped (on the device: ZeRO 0): a skipped step is
    not a step to time. Reads the device: call after the timed steps."""
    if step.skips.read()[0]:
        raise FloatingPointError(NONFINITE)


def timed_steps(step, batches: List[dict], steps: int, warmup: int) -> List[float]:
    """Seconds of each of ``steps`` micro-steps after ``warmup`` untimed ones
    (CUDA events on a GPU, wall time on a CPU)."""
    device = step.device
    for i in range(warmup):
        run_step(step, batches[i % len(batches)])
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (a, b) in enumerate(events):
            a.record()
            run_step(step, batches[i % len(batches)])
            b.record()
        sync(device)
        check_no_skips(step)
        return [a.elapsed_time(b) / 1e3 for a, b in events]
    times = []
    for i in range(steps):
        start = time.perf_counter()
        run_step(step, batches[i % len(batches)])
        times.append(time.perf_counter() - start)
    check_no_skips(step)
    return times


def loaded_batches(cfg: Config, args, n: int) -> List[Dict[str, torch.Tensor]]:
    """``n`` synthetic batches of the config's batch size, as the train loader hands them over."""
    lengths = caption_lengths(args.caption_len)
    return [as_loaded(synthetic_batch(cfg, cfg.train.batch_size, args.regions, lengths, seed=s)) for s in range(n)]


def speed(cfg: Config, step, batches: List[dict], times: Sequence[float], args) -> Dict[str, float]:
    """ms/step (median), samples/s, peak memory, TFLOP/s and MFU of timed steps."""
    B, med = cfg.train.batch_size, statistics.median(times)
    text_len = statistics.mean(b["input_ids"].shape[1] for b in batches)
    flops = count(cfg.model, StepShape(B, round(text_len), args.regions, step.queue.pool_size, du.world_size()))
    tflops = flops.per_step(B) / med / 1e12
    return {"batch": B, "queue_pool": step.queue.pool_size, "padded_text_len": text_len,
            "ms_per_step": med * 1e3, "samples_per_s": B / med, "peak_memory_gb": peak_memory_gb(step.device),
            "gflop_per_sample": flops.train / 1e9, "gflop_per_sample_exact": flops.exact_train / 1e9,
            "tflops": tflops, "mfu": tflops / args.peak_tflops}


def train_section(cfg: Config, args) -> Dict[str, object]:
    from .diagnose import profile_steps, sync_points
    from .phases import breakdown

    step = build_step(cfg)
    device = step.device
    batches = loaded_batches(cfg, args, 4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed_steps(step, batches, args.steps, args.warmup)
    out = {"device": device_name(device), "device_type": device.type, "precision": cfg.train.precision,
           "regions": args.regions,
           "params_online": sum(p.numel() for p in step.engine.module.parameters() if p.requires_grad),
           **speed(cfg, step, batches, times, args), "steps": args.steps, "warmup": args.warmup,
           "step_ms_all": [round(t * 1e3, 2) for t in times]}
    if args.breakdown_steps:
        # torch.compile refuses to trace under the collective counter's dispatch mode.
        out["breakdown"] = breakdown(step, batches, args.breakdown_steps,
                                     comm_steps=int(cfg.train.compile == "none"))
    # Diagnostics: a failure is reported, not fatal to the figures above.
    if args.sync_debug:
        try:
            out["sync_points"] = sync_points(step, batches[0])
        except Exception as exc:  # noqa: BLE001
            out["sync_points"] = [f"sync debug failed: {exc!r}"[:300]]
    if args.profile:
        try:
            out["profile"] = profile_steps(step, batches, args.profile_steps, args.profile)
        except Exception as exc:  # noqa: BLE001
            print(f"profile failed: {exc!r}"[:300])
    return out


def print_train(r: Dict[str, object], args) -> None:
    from .diagnose import print_diagnostics
    from .phases import print_breakdown

    print(f"\n== training step: {r['device']}, {r['precision']}, batch {r['batch']}, pool {r['queue_pool']}, "
          f"{r['regions']} regions, captions padded to {r['padded_text_len']:.1f} tokens, "
          f"{r['params_online'] / 1e6:.1f}M trainable parameters ==")
    print(f"FLOPs per sample: {r['gflop_per_sample']:.3f} G (3 x fwd + momentum fwd + 3 x loss; "
          f"{r['gflop_per_sample_exact']:.3f} G with the exact backward)")
    cols = ["ms/step", "samples/s", "peak mem GB", "TFLOP/s", "MFU"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    print(f"| {r['ms_per_step']:.1f} | {r['samples_per_s']:.1f} | {r['peak_memory_gb']:.2f} | {r['tflops']:.3f} | "
          f"{100 * r['mfu']:.2f}% |")
    mem = "CUDA max allocated" if r["device_type"] == "cuda" else "process max RSS"
    print(f"(median of {r['steps']} steps after {r['warmup']} warm-up; peak memory = {mem}; MFU vs "
          f"{args.peak_tflops:g} TFLOP/s" + (")" if r["device_type"] == "cuda" else
                                               ": a GPU peak, not meaningful on a CPU)"))
    if "breakdown" in r:
        print_breakdown(r["breakdown"])
    print_diagnostics(r)
