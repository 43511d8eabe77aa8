"""Why the training step takes the time it takes: a torch.profiler summary
(``--profile``) and the places where it makes the host wait for the device
(``--sync-debug``)."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Dict, List

import torch

from user_dist.atomic import AtomicFile

from .common import sync
from .step import run_step


def profile_steps(step, batches: List[dict], steps: int, path: str) -> Dict[str, object]:
    """torch.profiler over ``steps`` micro-steps: the top operators by device
    time and by host time (written to ``path``), the device's busy time
    against the wall time, and the number of kernel launches and host syncs
    per step: whether the step is bound by the device or by the host."""
    from torch.profiler import ProfilerActivity, profile

    cuda = step.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(step.device)
    start = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(steps):
            run_step(step, batches[i % len(batches)])
        sync(step.device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(getattr(e, dev_attr, 0) for e in on_device) if cuda else 0
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                        "cuLaunchKernelEx"))
    syncs = {e.key: e.count / steps for e in events if "Synchronize" in e.key or e.key in ("cudaMemcpyAsync",)}
    out = {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "device_busy_ms_per_step": busy_us / 1e3 / steps,
           "device_kernels_per_step": sum(e.count for e in on_device) / steps,
           "kernel_launches_per_step": launches / steps, "sync_calls_per_step": syncs, "table": path}
    with AtomicFile(path) as f:
        f.write(json.dumps({k: v for k, v in out.items() if k != "table"}, indent=1) + "\n\n")
        for sort in ([dev_attr] if cuda else []) + ["self_cpu_time_total"]:
            f.write(f"== sorted by {sort} ==\n")
            f.write(events.table(sort_by=sort, row_limit=45, max_name_column_width=70) + "\n")
    return out


def sync_points(step, batch: dict) -> List[str]:
    """Where one micro-step makes the host wait for the device (CUDA only):
    torch's sync debug mode warns at every synchronising call; the Python
    line that made it is listed with its count."""
    if step.device.type != "cuda":
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

    sync(step.device)
    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_step(step, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{n} x {k}" for k, n in sorted(found.items(), key=lambda kv: -kv[1])]


def print_diagnostics(r: Dict[str, object]) -> None:
    """The host syncs and the profile summary of a train section's result, if taken."""
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
