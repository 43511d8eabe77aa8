#!/usr/bin/env python
"""Benchmark of the training step, the data pipeline, evaluation and communication.

    python launch/benchmark.py --preset tiny --steps 5                 # seconds on a CPU
    python launch/benchmark.py --preset paper --batch 8 --steps 2      # BERT-base, about a minute on a CPU
    python launch/benchmark.py --preset paper --reference ../shared/gpu/bench_reference.py   # on a GPU
    python launch/benchmark.py --preset tiny --sections dist           # 2 gloo ranks: bytes per step
    python launch/benchmark.py --sections train,data,eval,dist queue.size_per_rank=2048

Sections (``--sections``, comma separated):

- ``train``: the training step of launch/train.py (DeepSpeed engine, fp32
  momentum towers, queues, UTO: ``TrainStep.micro_step`` itself) on synthetic
  in-memory batches (random regions, random token ids of COCO-like caption
  lengths). Prints ms/step (median after warm-up), samples/s per process,
  peak memory, TFLOP/s and MFU from the analytic count of user_dist.flops,
  and where the step goes (each phase bracketed by device syncs).
  ``--reference PATH`` also runs /work/shared/gpu/bench_reference.py's step in
  this process (same batch, regions, caption lengths and queue) and prints
  the ratio.
- ``data``: samples/s per loader worker (launch/bench_data.py).
- ``eval``: encode 5,000 images + 25,000 captions and score them
  (launch/bench_eval.py's functions).
- ``dist``: 2 gloo ranks on this machine (CPU), ``queue.mode`` replicated vs
  sharded: step time, bytes communicated per step per rank (every
  torch.distributed collective counted) against the formula of
  :func:`comm_formula`, and the queue memory per rank against one process.

Any ``key=value`` overrides the preset's config (``--list-keys`` in launch/train.py).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from user_dist.config import Config, load_config  # noqa: E402
from user_dist.flops import StepShape, count  # noqa: E402

# tiny: the model of configs/synthetic.yaml; paper: the schema defaults
# (BERT-base random init, 36 x 2048 regions, embed 1024, batch 128, queue 4096, bf16).
PRESETS = {"tiny": os.path.join(ROOT, "configs", "synthetic.yaml"), "paper": None}
# Bytes per element of what each collective moves, for the formula.
FP32, INT64, INT32 = 4, 8, 4


# --------------------------------------------------------------------------- config and batches


def build_config(preset: str, overrides: Sequence[str] = (), precision: str = "", batch: int = 0) -> Config:
    """The preset's config with --precision/--batch and key=value overrides applied."""
    extra = ["data.mode=regions"]
    if precision:
        extra.append(f"train.precision={precision}")
    if batch:
        extra.append(f"train.batch_size={batch}")
    return load_config(PRESETS[preset], extra + list(overrides))


def caption_lengths(spec: str) -> range:
    """'12-20' -> range(12, 21): token counts (with [CLS] and [SEP]) drawn uniformly."""
    try:
        lo, hi = (int(x) for x in spec.split("-"))
    except ValueError:
        raise SystemExit(f"--caption-len '{spec}': expected MIN-MAX, e.g. 12-20") from None
    if not 2 <= lo <= hi:
        raise SystemExit(f"--caption-len '{spec}': need 2 <= MIN <= MAX")
    return range(lo, hi + 1)


def synthetic_batch(cfg: Config, batch: int, regions: int, lengths: range, seed: int) -> Dict[str, torch.Tensor]:
    """A training batch as the loader yields it (CPU tensors, docs/architecture.md):
    regions (B, R, F) float16 all real, captions of random lengths in ``lengths``
    padded to the batch's longest, unique image ids."""
    g = torch.Generator().manual_seed(seed)
    n_tok = torch.randint(lengths.start, lengths.stop, (batch,), generator=g)
    L = int(n_tok.max())
    attention = (torch.arange(L)[None] < n_tok[:, None]).long()  # (B, L)
    vocab = cfg.model.text.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, L), generator=g) * attention  # no special tokens
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(batch), n_tok - 1] = 102  # [SEP]
    # float16 regions, as the loader hands over the shards' features (the step converts on the device).
    return {"regions": torch.relu(torch.randn(batch, regions, cfg.model.region_dim, generator=g)).half(),
            "region_mask": torch.ones(batch, regions, dtype=torch.bool),
            "input_ids": ids, "attention_mask": attention,
            "image_ids": torch.arange(seed * batch, (seed + 1) * batch)}


def as_loaded(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The batch as the train loader hands it over: in pinned host memory when
    CUDA is there (DataLoader(pin_memory=True)), so the step's copies to the
    device are asynchronous as in launch/train.py."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.pin_memory() for k, v in batch.items()}


# --------------------------------------------------------------------------- timing and counting


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Wall time per named phase, each bracketed by device syncs.

    ``current`` names the phase running now, so that collectives can be
    attributed to it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, List[float]] = defaultdict(list)
        self.current = "other"

    def wrap(self, phase: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            sync(self.device)
            outer, self.current = self.current, phase
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[phase].append(time.perf_counter() - start)
                self.current = outer
        return timed


class _Timed:
    """Stands in for an object; the methods named in ``phases`` are timed."""

    def __init__(self, obj, clock: PhaseClock, phases: Dict[str, str]):
        self._obj, self._clock, self._phases = obj, clock, phases

    def __getattr__(self, name):
        attr = getattr(self._obj, name)
        return self._clock.wrap(self._phases[name], attr) if name in self._phases else attr

    def __call__(self, *args, **kwargs):
        return self._clock.wrap(self._phases["__call__"], self._obj)(*args, **kwargs)


# Collectives whose payload is counted: name -> bytes of one call's payload.
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_PAYLOAD = {
    # all_reduce / broadcast: the tensor; all_gather: the gathered result (world x input).
    "all_reduce": lambda *a, **k: _nbytes(k.get("tensor", a[0] if a else None)),
    "broadcast": lambda *a, **k: _nbytes(k.get("tensor", a[0] if a else None)),
    "all_gather": lambda *a, **k: sum(_nbytes(t) for t in k.get("tensor_list", a[0] if a else ())),
    "all_gather_into_tensor": lambda *a, **k: _nbytes(k.get("output_tensor", a[0] if a else None)),
    "reduce_scatter_tensor": lambda *a, **k: _nbytes(k.get("input", a[1] if len(a) > 1 else None)),
    # torch 2.14's names for the two above (the old ones call them inside torch, uncounted twice).
    "all_gather_single": lambda *a, **k: _nbytes(k.get("output_tensor", a[0] if a else None)),
    "reduce_scatter_single": lambda *a, **k: _nbytes(k.get("input", a[1] if len(a) > 1 else None)),
    "reduce_scatter": lambda *a, **k: sum(_nbytes(t) for t in k.get("input_list", a[1] if len(a) > 1 else ())),
    "all_to_all_single": lambda *a, **k: _nbytes(k.get("input", a[1] if len(a) > 1 else None)),
}


class CommCounter:
    """Counts every torch.distributed collective made while active: calls and
    payload bytes per (phase, collective), and the seconds spent inside.

    Payload: the all-reduced / broadcast tensor, the all-gathered output.
    DeepSpeed's comm layer and torch.distributed.nn both call these
    functions through the torch.distributed module, so they are counted too.
    """

    def __init__(self, clock: Optional[PhaseClock] = None):
        self.clock = clock
        self.bytes: Dict[tuple, int] = defaultdict(int)
        self.calls: Dict[tuple, int] = defaultdict(int)
        self.seconds = 0.0
        self._saved: Dict[str, Callable] = {}

    def __enter__(self) -> "CommCounter":
        for name, payload in _PAYLOAD.items():
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._counted(name, fn, payload))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()

    def _counted(self, name: str, fn: Callable, payload: Callable) -> Callable:
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            key = (self.clock.current if self.clock else "step", name)
            self.bytes[key] += payload(*args, **kwargs)
            self.calls[key] += 1
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.clock is not None:
                sync(self.clock.device)
            self.seconds += time.perf_counter() - start
            return out
        return counted

    def total(self) -> int:
        return sum(self.bytes.values())


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated on a GPU; the process's max resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


# --------------------------------------------------------------------------- the training step


def build_step(cfg: Config):
    """The engine, key towers, queues and loss of launch/train.py's step
    (``user_dist.trainer.TrainStep``), without data stream, run folder or monitor."""
    from user_dist.trainer import TrainStep

    return TrainStep(cfg, steps_per_epoch=10 ** 6, total_steps=10 ** 6)


def micro_step(state, batch: Dict[str, torch.Tensor]):
    """One training micro-step exactly as launch/train.py runs it (``state`` is a
    TrainStep, or a namespace of its attributes with timed wrappers)."""
    from user_dist.trainer import TrainStep

    out = TrainStep.micro_step(state, batch)
    if out is None:  # checked on the host (ZeRO 1-2, fp16)
        raise FloatingPointError(NONFINITE)
    return out


NONFINITE = ("non-finite loss in the benchmark step (random data, random init): "
             "try train.precision=fp32 or another --seed")


def check_no_skips(state) -> None:
    """Raise if a step was skipped on the device (ZeRO 0): a skipped step is
    not a step to time. Reads the device: call after the timed steps."""
    if getattr(state, "skips", None) is not None and state.skips.read()[0]:
        raise FloatingPointError(NONFINITE)


def timed_steps(state, batches: List[dict], steps: int, warmup: int) -> List[float]:
    """Seconds of each of ``steps`` micro-steps after ``warmup`` untimed ones
    (CUDA events on a GPU, wall time on a CPU)."""
    device = state.device
    for i in range(warmup):
        micro_step(state, batches[i % len(batches)])
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for i, (a, b) in enumerate(events):
            a.record()
            micro_step(state, batches[i % len(batches)])
            b.record()
        sync(device)
        check_no_skips(state)
        return [a.elapsed_time(b) / 1e3 for a, b in events]
    times = []
    for i in range(steps):
        start = time.perf_counter()
        micro_step(state, batches[i % len(batches)])
        times.append(time.perf_counter() - start)
    check_no_skips(state)
    return times


# The phases of TrainStep.micro_step, by the call that runs them (in step order).
PHASES = [("engine", "__call__", "forward (online towers)"), ("momentum", "encode", "momentum encode"),
          ("_uto_loss", None, "loss (UTO)"), ("engine", "backward", "backward (+ grad all-reduce)"),
          ("engine", "step", "optimiser step"), ("momentum", "update", "momentum update"),
          ("queue", "enqueue", "enqueue keys")]


def breakdown(state, batches: List[dict], steps: int) -> Dict[str, object]:
    """Median seconds per phase of ``TrainStep.micro_step`` (each phase synced),
    and the time and bytes of the collectives inside them."""
    clock = PhaseClock(state.device)
    timed = types.SimpleNamespace(**vars(state))
    for attr in ("engine", "momentum", "queue"):
        names = {name: label for owner, name, label in PHASES if owner == attr}
        setattr(timed, attr, _Timed(getattr(state, attr), clock, names))
    timed._uto_loss = clock.wrap("loss (UTO)", state._uto_loss)
    totals = []
    with CommCounter(clock) as comm:
        for i in range(steps):
            sync(state.device)
            start = time.perf_counter()
            micro_step(timed, batches[i % len(batches)])
            sync(state.device)
            totals.append(time.perf_counter() - start)
    phases = {label: statistics.median(clock.seconds[label]) for _, _, label in PHASES}
    total = statistics.median(totals)
    phases["other (inputs to the device, clipping, the finite-loss flag)"] = max(0.0, total - sum(phases.values()))
    return {"phases": phases, "total": total, "comm_seconds": comm.seconds / steps,
            "comm_bytes": {f"{p}: {c}": b // steps for (p, c), b in comm.bytes.items()},
            "comm_calls": {f"{p}: {c}": n / steps for (p, c), n in comm.calls.items()}}


def train_section(cfg: Config, args) -> Dict[str, object]:
    state = build_step(cfg)
    device = state.device
    B = cfg.train.batch_size
    lengths = caption_lengths(args.caption_len)
    batches = [as_loaded(synthetic_batch(cfg, B, args.regions, lengths, seed=s)) for s in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = timed_steps(state, batches, args.steps, args.warmup)
    med = statistics.median(times)
    peak = peak_memory_gb(device)
    text_len = statistics.mean(b["input_ids"].shape[1] for b in batches)
    flops = count(cfg.model, StepShape(B, round(text_len), args.regions, state.queue.pool_size, state.world))
    tflops = flops.per_step(B) / med / 1e12
    out = {"device": _device_name(device), "device_type": device.type, "precision": cfg.train.precision, "batch": B,
           "queue_pool": state.queue.pool_size, "padded_text_len": text_len, "regions": args.regions,
           "params_online": sum(p.numel() for p in state.engine.module.parameters() if p.requires_grad),
           "ms_per_step": med * 1e3, "samples_per_s": B / med, "peak_memory_gb": peak,
           "gflop_per_sample": flops.train / 1e9, "gflop_per_sample_exact": flops.exact_train / 1e9,
           "tflops": tflops, "mfu": tflops / args.peak_tflops, "steps": args.steps, "warmup": args.warmup,
           "step_ms_all": [round(t * 1e3, 2) for t in times]}
    if args.breakdown_steps:
        out["breakdown"] = breakdown(state, batches, args.breakdown_steps)
    # Diagnostics: a failure is reported, not fatal to the figures above.
    if args.sync_debug:
        try:
            out["sync_points"] = sync_points(state, batches[0])
        except Exception as exc:  # noqa: BLE001
            out["sync_points"] = [f"sync debug failed: {exc!r}"[:300]]
    if args.profile:
        try:
            out["profile"] = profile_steps(state, batches, args.profile_steps, args.profile)
        except Exception as exc:  # noqa: BLE001
            print(f"profile failed: {exc!r}"[:300])
    return out


def profile_steps(state, batches: List[dict], steps: int, path: str) -> Dict[str, object]:
    """torch.profiler over ``steps`` micro-steps: the top operators by device
    time and by host time (written to ``path``), the device's busy time
    against the wall time, and the number of kernel launches and host syncs
    per step: whether the step is bound by the device or by the host."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if state.device.type == "cuda" else [])
    sync(state.device)
    start = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(steps):
            micro_step(state, batches[i % len(batches)])
        sync(state.device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    busy_us = sum(getattr(e, dev_attr, 0) for e in events if e.device_type == torch.autograd.DeviceType.CUDA) \
        if state.device.type == "cuda" else 0
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                        "cuLaunchKernelEx"))
    syncs = {e.key: e.count / steps for e in events if "Synchronize" in e.key or e.key in ("cudaMemcpyAsync",)}
    out = {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "device_busy_ms_per_step": busy_us / 1e3 / steps,
           "device_kernels_per_step": kernels / steps, "kernel_launches_per_step": launches / steps,
           "sync_calls_per_step": syncs, "table": path}
    with open(path, "w") as f:
        f.write(json.dumps({k: v for k, v in out.items() if k != "table"}, indent=1) + "\n\n")
        for sort in ([dev_attr] if state.device.type == "cuda" else []) + ["self_cpu_time_total"]:
            f.write(f"== sorted by {sort} ==\n")
            f.write(events.table(sort_by=sort, row_limit=45, max_name_column_width=70) + "\n")
    return out


def sync_points(state, batch: dict) -> List[str]:
    """Where one micro-step makes the host wait for the device (CUDA only):
    torch's sync debug mode warns at every synchronising call; the Python
    line that made it is listed with its count."""
    if state.device.type != "cuda":
        return []
    import traceback
    import warnings

    found: Dict[str, int] = defaultdict(int)

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename]
        ours = [f for f in frames if "/user_dist/" in f.filename or "/launch/" in f.filename]
        where = ours[-1] if ours else frames[-1]
        inner = frames[-1]
        found[f"{where.filename.split('/')[-1]}:{where.lineno} via {inner.filename.split('/')[-1]}:{inner.lineno}: "
              f"{str(message)[:80]}"] += 1

    sync(state.device)
    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            micro_step(state, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{n} x {k}" for k, n in sorted(found.items(), key=lambda kv: -kv[1])]


def batch_sweep(cfg_for, sizes: Sequence[int], args) -> List[Dict[str, object]]:
    """ms/step, samples/s, peak memory and MFU at each per-process batch size,
    up to the first that does not fit (CUDA out of memory)."""
    import gc

    rows = []
    for B in sizes:
        gc.collect()  # the engines of earlier sections hold device memory until collected
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        cfg = cfg_for(B)
        state = None
        try:
            state = build_step(cfg)
            lengths = caption_lengths(args.caption_len)
            batches = [as_loaded(synthetic_batch(cfg, B, args.regions, lengths, seed=s)) for s in range(2)]
            if state.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(state.device)
            times = timed_steps(state, batches, args.sweep_steps, 2)
            med = statistics.median(times)
            text_len = statistics.mean(b["input_ids"].shape[1] for b in batches)
            flops = count(cfg.model, StepShape(B, round(text_len), args.regions, state.queue.pool_size, state.world))
            tflops = flops.per_step(B) / med / 1e12
            rows.append({"batch": B, "ms_per_step": med * 1e3, "samples_per_s": B / med,
                         "peak_memory_gb": peak_memory_gb(state.device), "tflops": tflops,
                         "mfu": tflops / args.peak_tflops, "queue_pool": state.queue.pool_size})
        except torch.OutOfMemoryError as exc:
            rows.append({"batch": B, "error": f"out of memory: {str(exc)[:120]}"})
            break
        finally:
            del state
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_train(r: Dict[str, object], args) -> None:
    print(f"\n== training step: {r['device']}, {r['precision']}, batch {r['batch']}, pool {r['queue_pool']}, "
          f"{r['regions']} regions, captions padded to {r['padded_text_len']:.1f} tokens, "
          f"{r['params_online'] / 1e6:.1f}M trainable parameters ==")
    print(f"FLOPs per sample: {r['gflop_per_sample']:.3f} G (3 x fwd + momentum fwd + 3 x loss; "
          f"{r['gflop_per_sample_exact']:.3f} G with the exact backward)")
    cols = ["ms/step", "samples/s", "peak mem GB", "TFLOP/s", "MFU"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    print(f"| {r['ms_per_step']:.1f} | {r['samples_per_s']:.1f} | {r['peak_memory_gb']:.2f} | {r['tflops']:.3f} | "
          f"{100 * r['mfu']:.2f}% |")
    mem = "CUDA max allocated" if "cpu" not in r["device"] else "process max RSS"
    print(f"(median of {r['steps']} steps after {r['warmup']} warm-up; peak memory = {mem}; MFU vs "
          f"{args.peak_tflops:g} TFLOP/s" + (": a GPU peak, not meaningful on a CPU)" if "cpu" in r["device"] else ")"))
    if "breakdown" in r:
        b = r["breakdown"]
        print(f"\nwhere the step goes (median of {args.breakdown_steps} synced steps, {1e3 * b['total']:.1f} ms):")
        print("| phase | ms | share |\n|---|---|---|")
        for phase, s in b["phases"].items():
            print(f"| {phase} | {1e3 * s:.2f} | {100 * s / b['total']:.1f}% |")
        print(f"| (communication, inside the phases above) | {1e3 * b['comm_seconds']:.2f} | "
              f"{100 * b['comm_seconds'] / b['total']:.1f}% |")
    if "sync_points" in r:
        print(f"\nhost syncs in one step ({len(r['sync_points'])} places):" if r["sync_points"]
              else "\nhost syncs in one step: none")
        for line in r["sync_points"]:
            print("  " + line)
    if "profile" in r:
        p = r["profile"]
        print(f"\nprofile ({p['steps']} steps, {p['table']}): wall {p['wall_ms_per_step']:.1f} ms/step, device busy "
              f"{p['device_busy_ms_per_step']:.1f} ms/step, {p['device_kernels_per_step']:.0f} kernels and "
              f"{p['kernel_launches_per_step']:.0f} launches per step, sync calls {p['sync_calls_per_step']}")


# --------------------------------------------------------------------------- reference


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
    """Run the reference's training step (its ``run_variant``) at our batch,
    regions, caption lengths and queue; return its result rows."""
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
    rows = []
    for variant in args.reference_variants.split(","):
        r = ref.run_variant(variant, ns, d, device, fl)
        rows.append(r)
    return rows


def print_reference(rows: List[Dict[str, object]], ours: Dict[str, object]) -> None:
    print("\n== reference (bench_reference.py) in the same process, same sizes ==")
    print("| variant | ms/step | samples/s | ours / reference (samples/s) |\n|---|---|---|---|")
    for r in rows:
        if r.get("status") == "error":
            print(f"| {r['variant']} | error: {r.get('error', '')[:100]} | | |")
            continue
        print(f"| {r['variant']} | {r['median_step_ms']:.1f} | {r['samples_per_s']:.1f} | "
              f"{ours['samples_per_s'] / r['samples_per_s']:.2f}x |")


# --------------------------------------------------------------------------- data and evaluation


def data_section(args) -> List[tuple]:
    """Per-worker decode and batch rates (launch/bench_data.py) on fixtures built here."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import bench_data

    from user_dist.config import DataConfig, TextEncoderConfig
    from user_dist.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(TextEncoderConfig())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a loader worker
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, mode, folder in bench_data.build_fixtures(tmp, args.data_images):
                cfg = DataConfig(train_shards=folder, mode=mode, num_workers=0)
                rows.append((name, bench_data.decode_rate(folder, cfg, args.data_seconds),
                             bench_data.batch_rate(cfg, tokenizer, min(128, 5 * args.data_images),
                                                   args.data_seconds)))
    finally:
        torch.set_num_threads(threads)
    print("\n== data pipeline, per loader worker (launch/bench_data.py) ==")
    print("| shards | decode (images/s) | train batches (pairs/s) |\n|---|---|---|")
    for name, dec, bat in rows:
        print(f"| {name} | {dec:,.0f} | {bat:,.0f} |")
    return rows


def eval_section(preset: str, overrides: Sequence[str], args) -> Dict[str, object]:
    """The COCO 5K evaluation with the evaluation job's own code
    (launch/bench_eval.py's bench_coco5k): encode 5,000 images and 25,000
    captions with the preset's towers, the similarity matrix and both
    protocols scored where it lives."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import bench_eval

    tower_overrides = bench_eval.TINY if preset == "tiny" else []
    r = bench_eval.bench_coco5k(list(tower_overrides) + list(overrides), args.eval_batch, 32,
                                n_images=args.eval_images)
    print(f"\n== evaluation, {r['n_images']:,} images x {5 * r['n_images']:,} captions, {preset} towers, on "
          f"{r['device']} (scored as {r['scored_as']}) ==")
    print("| encode images (s) | encode captions (s) | similarities (s) | score coco5k (s) | score coco1k (s) | "
          "total (s) |\n|---|---|---|---|---|---|")
    coco1k = "-" if r["score_coco1k"] is None else f"{r['score_coco1k']:.3f}"
    print(f"| {r['encode_images']:.3f} | {r['encode_captions']:.3f} | {r['similarities']:.3f} | "
          f"{r['score_coco5k']:.3f} | {coco1k} | {r['total']:.3f} |")
    print(f"(batches of {args.eval_batch} images / {5 * args.eval_batch} captions of 32 tokens, random init; "
          "the job's precision: bf16 on CUDA, fp32 on a CPU)")
    return r


# --------------------------------------------------------------------------- communication


def sync_norm_widths(model: torch.nn.Module) -> List[int]:
    """Channels C of every synced MaskedBatchNorm of a model (each all-gathers
    (count, mean, M2) = 2C + 1 floats per rank in training mode)."""
    from user_dist.models.gse import MaskedBatchNorm

    return [m.num_features for m in model.modules() if isinstance(m, MaskedBatchNorm) and m.sync]


def comm_formula(cfg: Config, world: int, n_params: int, norm_widths: Sequence[int],
                 grad_bytes: int = FP32) -> Dict[str, int]:
    """Payload bytes per rank per micro-step by collective, as the code
    communicates them (all-reduce: the tensor; all-gather: the gathered output).

    W ranks, B samples per rank, E embedding size, N trainable parameters:

    - gradient all-reduce (DeepSpeed, ZeRO 0): N x grad_bytes
    - in-batch features, all-gathered with gradient (user_dist.loss): image and
      text, forward 2 W B E x 4 and their backward reduce-scatter 2 W B E x 4;
      image ids W B x 8
    - keys enqueued (user_dist.queue): replicated, all-gathered: 2 W B E x 4
      + ids W B x 8; sharded, sent to their slots' owners in one all-to-all
      (payload: what a rank sends): 2 B E x 4 + ids B x 8
    - finite-loss agreement: 4 (clipping without ZeRO needs no collective:
      the averaged gradients are equal on every rank)
    - synced BatchNorm statistics of the online towers (train mode): per norm
      of C channels W (2C + 1) x 4 gathered forward, the same reduce-scattered
      backward; key towers in train mode add the forward gather
    - sharded queue only: the query max all-reduce 2 W B x 4, the sum / active
      / count all-reduce 6 W B x 4 and its backward 6 W B x 4

    The pool size P does not appear: neither mode moves queue entries; the
    sharded one moves per-query statistics instead.
    """
    B, E, W = cfg.train.batch_size, cfg.model.embed_size, world
    norms = sum(W * (2 * c + 1) * FP32 for c in norm_widths)
    out = {
        "gradient all-reduce": n_params * grad_bytes,
        "in-batch features (gather + backward reduce-scatter)": 4 * W * B * E * FP32 + W * B * INT64,
        # Replicated: every rank gathers every key; sharded: each key goes to its slot's owner (all-to-all).
        "keys to the queue": (2 * E * FP32 + INT64) * B * (W if cfg.queue.mode == "replicated" else 1),
        "finite-loss check": INT32,
        "synced norms (gather + backward reduce-scatter)": norms * (3 if cfg.queue.key_train_mode else 2),
    }
    if cfg.queue.mode == "sharded":
        out["sharded queue statistics (max, sums + backward)"] = (2 + 6 + 6) * W * B * FP32
    return out


def ring_wire_bytes(by_collective: Dict[str, int], world: int) -> int:
    """Bytes a rank sends for these payloads with ring algorithms: an
    all-reduce of n bytes sends 2 (W-1)/W n, an all-gather of n bytes (W-1)/W n."""
    total = 0.0
    for key, n in by_collective.items():
        total += n * (world - 1) / world * (2 if "all_reduce" in key else 1)
    return int(total)


def dist_worker(args) -> None:
    """One rank of the --sections dist run: both queue modes, results as JSON (rank 0)."""
    from user_dist import distributed as du

    torch.set_num_threads(1)
    du.init_distributed(timeout_s=300)
    results = {}
    for mode in ("replicated", "sharded"):
        cfg = build_config(args.preset, list(args.overrides) + [f"queue.mode={mode}"], args.precision, args.batch)
        state = build_step(cfg)
        lengths = caption_lengths(args.caption_len)
        batches = [synthetic_batch(cfg, cfg.train.batch_size, args.regions, lengths, seed=s + 100 * du.rank())
                   for s in range(4)]
        for i in range(args.warmup):
            micro_step(state, batches[i % len(batches)])
        b = breakdown(state, batches, args.steps)
        q = state.queue
        n_params = sum(p.numel() for p in state.engine.module.parameters() if p.requires_grad)
        grad_dtype = next(p for p in state.engine.module.parameters() if p.requires_grad).dtype
        results[mode] = {
            "ms_per_step": b["total"] * 1e3, "comm_ms_per_step": b["comm_seconds"] * 1e3,
            "bytes_per_step": b["comm_bytes"],
            "formula": comm_formula(cfg, du.world_size(), n_params, sync_norm_widths(state.engine.module),
                                    torch.empty((), dtype=grad_dtype).element_size()),
            "pool_size": q.pool_size, "queue_bytes_per_rank": sum(_nbytes(t) for t in (q.image, q.text, q.ids)),
            "n_params": n_params, "batch": cfg.train.batch_size, "embed": cfg.model.embed_size,
            "size_per_rank": cfg.queue.size_per_rank,
        }
        del state
    if du.rank() == 0:
        with open(args.dist_worker, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def queue_bytes_one_process(cfg: Config) -> int:
    """Queue tensor bytes of one process (world 1): the baseline of the dist comparison."""
    from user_dist.queue import NegativeQueues

    q = NegativeQueues(cfg.queue, cfg.model.embed_size, "cpu")
    return sum(_nbytes(t) for t in (q.image, q.text, q.ids))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _common_argv(args) -> List[str]:
    argv = ["--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--caption-len", args.caption_len, "--regions", str(args.regions)]
    argv += ["--precision", args.precision] if args.precision else []
    argv += ["--batch", str(args.batch)] if args.batch else []
    return argv + list(args.overrides)


def dist_section(args, world: int = 2) -> Dict[str, object]:
    """``world`` gloo ranks of this script on the CPU (torchrun-style
    environment), both queue modes; measured bytes against the formula."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "dist.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--dist-worker", out] + _common_argv(args)
        procs = []
        for r in range(world):
            env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
            env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                       PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
            procs.append(subprocess.Popen(cmd, env=env))
        try:
            codes = [p.wait(timeout=args.dist_timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(codes) or not os.path.isfile(out):
            raise SystemExit(f"--sections dist: a rank failed (exit codes {codes}); its traceback is above")
        with open(out) as f:
            results = json.load(f)
    for mode, r in results.items():
        cfg = build_config(args.preset, list(args.overrides) + [f"queue.mode={mode}"], args.precision, args.batch)
        r["queue_bytes_one_process"] = queue_bytes_one_process(cfg)
        r["measured_total"] = sum(r["bytes_per_step"].values())
        r["formula_total"] = sum(r["formula"].values())
        r["ring_wire_bytes"] = ring_wire_bytes(r["bytes_per_step"], world)
    print(f"\n== {world} gloo ranks (CPU), bytes per micro-step per rank (payload; all-gather = gathered output) ==")
    print("| queue.mode | ms/step | measured bytes | formula bytes | ring wire bytes sent | pool | "
          "queue bytes/rank (W=2) | queue bytes (W=1) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['ms_per_step']:.1f} | {r['measured_total']:,} | {r['formula_total']:,} | "
              f"{r['ring_wire_bytes']:,} | {r['pool_size']} | {r['queue_bytes_per_rank']:,} | "
              f"{r['queue_bytes_one_process']:,} |")
    for mode, r in results.items():
        print(f"\n{mode}, measured per phase: collective -> bytes:")
        for key, n in r["bytes_per_step"].items():
            print(f"  {key}: {n:,}")
        print(f"{mode}, formula: " + "; ".join(f"{k}: {v:,}" for k, v in r["formula"].items()))
    return results


def project(cfg: Config, compute_ms: float, worlds: Sequence[int], gpus_per_node: int, nic_gbit_per_node: float,
            nvlink_gbyte: float) -> List[Dict[str, float]]:
    """Per-GPU samples/s at each world size from a compute time per step and
    the communicated bytes of :func:`comm_formula`.

    Model (stated in docs/performance.md): collectives are blocking and not
    overlapped with compute (ZeRO 0 all-reduces after the backward; the
    feature gathers sit on the loss's critical path); hierarchical ring
    algorithms: inside a node at ``nvlink_gbyte`` GB/s per GPU, across nodes
    through the node's NICs (``nic_gbit_per_node`` Gb/s in all). An all-reduce
    of n bytes moves 2 (k-1)/k n over a ring of k members, an all-gather with
    an output of n bytes (k-1)/k n; across nodes each node moves its share
    once for its GPUs.
    """
    from user_dist.models import build_model

    model = build_model(cfg.model, cfg.data.mode)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    norms = sync_norm_widths(model)
    rows = []
    for W in worlds:
        parts = comm_formula(cfg, W, n_params, norms)
        grad = parts["gradient all-reduce"]
        # Moved about once over the ring: gathers (their output) and the keys' all-to-all (its input).
        gathered = parts["keys to the queue"] + parts["in-batch features (gather + backward reduce-scatter)"] / 2
        reduced = sum(parts.values()) - grad - gathered  # the backward all-reduces and small statistics
        g = min(W, gpus_per_node)
        nodes = max(1, W // gpus_per_node)
        intra = (2 * (grad + reduced) + gathered) * (g - 1) / g / (nvlink_gbyte * 1e9)
        # Across nodes: each node sends its GPUs' shares once through its NICs.
        inter = (2 * (grad + reduced) + gathered) * (nodes - 1) / nodes / (nic_gbit_per_node / 8 * 1e9)
        comm_ms = 1e3 * (intra + inter)
        rows.append({"world": W, "nodes": nodes, "payload_mb": sum(parts.values()) / 1e6, "comm_ms": comm_ms,
                     "step_ms": compute_ms + comm_ms,
                     "samples_per_s_per_gpu": cfg.train.batch_size / ((compute_ms + comm_ms) / 1e3),
                     "efficiency": compute_ms / (compute_ms + comm_ms)})
    return rows


def print_projection(rows: List[Dict[str, float]], compute_ms: float, args) -> None:
    print(f"\n== projection: compute {compute_ms:.1f} ms/step, {args.gpus_per_node} GPUs/node, NVLink "
          f"{args.nvlink_gbyte:g} GB/s per GPU, {args.nic_gbit:g} Gb/s per node across nodes ==")
    print("| GPUs | nodes | payload MB/step/rank | comm ms | step ms | samples/s per GPU | scaling efficiency |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['nodes']} | {r['payload_mb']:.1f} | {r['comm_ms']:.1f} | {r['step_ms']:.1f} | "
              f"{r['samples_per_s_per_gpu']:,.0f} | {100 * r['efficiency']:.0f}% |")


# --------------------------------------------------------------------------- main


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
    p.add_argument("--sections", default="train", help="comma-separated: train, data, eval, dist, project")
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
    unknown = set(args.sections.split(",")) - {"train", "data", "eval", "dist", "project"}
    if unknown:
        p.error(f"--sections: unknown {', '.join(sorted(unknown))}; valid: train, data, eval, dist, project")
    return args


def main(argv=None) -> int:
    from user_dist.distributed import strip_local_rank_arg

    args = parse_args(strip_local_rank_arg(sys.argv[1:] if argv is None else list(argv)))
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
        from user_dist import distributed as du

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
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
