"""Memory of the training step: peak per sample, and the largest batch under a cap.

    python launch/bench_memory.py per-sample --preset paper --precision fp32 --batches 2,6 data.mode=jpg
    python launch/bench_memory.py largest --preset paper --precision fp32 --cap-gb 6 data.mode=jpg

Every measurement is a *probe*: a fresh process (``--child``) that builds
launch/train.py's step (``TrainStep``: DeepSpeed engine, fp32 key towers,
queues, UTO) and runs ``--steps`` real micro-steps (forward, backward,
optimiser) on synthetic batches of one per-process batch size: random
region features (``data.mode=regions``) or random normalised images
(``data.mode=jpg``), captions of ``--caption-len`` tokens. Two steps, since
AdamW allocates its moments in the first optimiser step: the second runs
forward and backward with them in memory.

Peak memory of a probe: on a CPU the process's peak resident set (the
kernel's ``VmHWM``, read from /proc while it runs, so no short spike is
missed); with CUDA, ``torch.cuda.max_memory_allocated``.

A cap (``largest``): on a CPU the probe is killed as soon as its VmHWM passes
``--cap-gb`` (a watcher, not RLIMIT_AS: torch reserves far more address space
than it touches, and this machine's cgroup is not writable); with CUDA the
probe limits its allocator to the cap
(``torch.cuda.set_per_process_memory_fraction``) and an out-of-memory error
is a miss. The search doubles the batch from ``--start`` until a miss, then
bisects until the bounds are within ``--tolerance``; ``--lo``/``--hi`` resume
from known bounds.

Variants (``--variant NAME=key=value,key=value``, repeatable; by default
``plain`` and ``grad_ckpt`` = ``train.grad_checkpointing=true``) are compared
under the same preset and overrides.

Accumulation: a probe step is one optimiser step, as the trainer runs it:
with ``train.grad_accum`` = k, k micro-batches, handed to
``TrainStep.cached_step`` all at once under ``train.accum_mode=cached`` (the
trainer holds the whole window), or to ``micro_step`` one after another
(plain: each micro-batch made just before its step). ``--micro-batch M``
fixes the micro-batch and makes every batch of the command (``--batches``,
``--start``, ``--lo``, ``--hi``, ``--max-batch``, the table) the
accumulated per-process batch M x k: a probe of batch B runs
``train.batch_size=M train.grad_accum=B/M``, and ``largest`` searches over k.

    python launch/bench_memory.py per-sample --preset paper --precision fp32 --micro-batch 16 --batches 32,128 \
        --variant cached=train.accum_mode=cached data.mode=jpg
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from . import ROOT

GIB = 2 ** 30
DEFAULT_VARIANTS = ("plain=", "grad_ckpt=train.grad_checkpointing=true")


# --------------------------------------------------------------------------- the probe (child process)


def synthetic_images(batch: int, size: int, seed: int):
    """(B, 3, size, size) float32, as the jpg loader hands them over (normalised)."""
    import torch

    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def child_main(spec: dict) -> None:
    """Build the step of ``spec`` and run its micro-steps; print one JSON line."""
    import torch

    from launch.bench.common import build_config, caption_lengths, synthetic_batch
    from user_dist import distributed as du

    micro = spec.get("micro_batch", 0)
    if micro:  # spec["batch"] is the accumulated batch: micro-batches of ``micro``, k of them per step
        cfg = build_config(spec["preset"], list(spec["overrides"]) + [f"train.grad_accum={spec['batch'] // micro}"],
                           spec["precision"], micro)
    else:
        cfg = build_config(spec["preset"], spec["overrides"], spec["precision"], spec["batch"])
    du.init_distributed(cfg.train.dist_timeout_s)
    from user_dist.train_step import TrainStep

    if torch.cuda.is_available() and spec["cap_gb"]:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * GIB / total))
    k = cfg.train.grad_accum
    out = {"batch": spec["batch"], "micro_batch": cfg.train.batch_size, "grad_accum": k,
           "accum_mode": cfg.train.accum_mode, "fits": True}
    start = time.perf_counter()
    try:
        step = TrainStep(cfg, steps_per_epoch=10 ** 6, total_steps=10 ** 6)
        # What building the step took at its peak, then the steps' own peak.
        out["build_peak_gb"] = _vm_hwm(os.getpid()) / GIB
        gc.collect()
        _reset_vm_hwm()
        if step.device.type == "cuda":
            out["build_peak_gb"] = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
        lengths = caption_lengths(spec["caption_len"])

        def make(seed: int) -> dict:
            regions = spec["regions"] if cfg.data.mode == "regions" else 1  # jpg: dropped below
            batch = synthetic_batch(cfg, cfg.train.batch_size, regions, lengths, seed=seed)
            if cfg.data.mode == "jpg":
                del batch["regions"], batch["region_mask"]
                batch["images"] = synthetic_images(cfg.train.batch_size, cfg.data.image_size, seed=seed)
            return batch

        steps_start = time.perf_counter()
        for i in range(spec["steps"]):  # optimiser steps, as the trainer runs them
            if step.cached:  # the whole window at once, as the trainer collects it
                step.cached_step([make(i * k + j) for j in range(k)], i)
            else:
                for j in range(k):
                    step.micro_step(make(i * k + j), i)
        if step.device.type == "cuda":
            torch.cuda.synchronize()
        out["seconds_per_step"] = (time.perf_counter() - steps_start) / spec["steps"]
        # What DeepSpeed counted: whole windows of k micro-batches per optimiser step.
        out["optimizer_steps"], out["micro_steps"] = step.engine.global_steps, step.engine.micro_steps
        if step.device.type == "cuda":
            out["step_peak_gb"] = torch.cuda.max_memory_allocated() / GIB
            out["cuda"] = True
        else:
            out["step_peak_gb"] = _vm_hwm(os.getpid()) / GIB
    except torch.OutOfMemoryError as exc:
        out.update(fits=False, error=f"out of memory: {str(exc)[:160]}")
    out["seconds"] = time.perf_counter() - start
    print("PROBE " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- running probes


def _vm_hwm(pid: int) -> int:
    """Peak resident set of ``pid`` in bytes (Linux VmHWM), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _reset_vm_hwm() -> None:
    """Restart this process's VmHWM from its current resident set (Linux
    >= 4.0: '5' to clear_refs), so that the steps' peak is read on its own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def probe(args, overrides: Sequence[str], batch: int, cap_gb: float) -> dict:
    """One probe in a fresh process. ``fits`` is False when it passed the cap
    (killed) or ran out of CUDA memory; ``error`` holds any other failure."""
    spec = {"preset": args.preset, "precision": args.precision, "overrides": list(overrides), "batch": batch,
            "micro_batch": args.micro_batch, "steps": args.steps, "regions": args.regions,
            "caption_len": args.caption_len, "cap_gb": cap_gb}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "bench_memory.py"), "--child", json.dumps(spec)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    cap, peak, killed = cap_gb * GIB, 0, False
    while proc.poll() is None:
        peak = max(peak, _vm_hwm(proc.pid))
        if cap and peak > cap and not killed:  # CPU: the watcher is the cap
            proc.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(0.01)
    stdout, stderr = proc.communicate()
    row = {"batch": batch, "wall_s": round(time.perf_counter() - start, 1)}
    line = next((ln for ln in stdout.splitlines() if ln.startswith("PROBE ")), None)
    if killed:
        row.update(fits=False, error=f"killed: resident set passed the {cap_gb:g} GiB cap",
                   rss_peak_gb=peak / GIB)
    elif line is None:
        row.update(fits=False, error=f"probe failed (exit {proc.returncode}): {stderr.strip()[-600:]}")
    else:
        row.update(json.loads(line[len("PROBE "):]))
    # The whole process, build included: the watcher's maximum, or the child's own reads.
    row["rss_peak_gb"] = max([peak / GIB] + [row[k] for k in ("build_peak_gb", "step_peak_gb")
                                             if k in row and not row.get("cuda")])
    return row


def parse_variants(specs: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """'NAME=key=value,key=value' -> (NAME, [key=value, ...])."""
    out = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--variant '{spec}': expected NAME=key=value,key=value (or NAME= for no override)")
        out.append((name, [kv for kv in rest.split(",") if kv]))
    return out


def peak_of(row: dict, steps_only: bool = False) -> float:
    """The probe's peak in GiB: the whole process's peak RSS (CPU) or the
    build's and the steps' CUDA peak; ``steps_only``: the steps' alone."""
    if steps_only or row.get("cuda"):
        return max(row.get("step_peak_gb", 0.0), 0.0 if steps_only else row.get("build_peak_gb", 0.0))
    return row.get("rss_peak_gb", 0.0)


# --------------------------------------------------------------------------- per sample


def _printed(name: str, row: dict) -> dict:
    """Each probe as it ends: a run cut short still leaves its probes."""
    print(f"  {name} batch {row['batch']}: {json.dumps(row)}", flush=True)
    return row


def per_sample(args, variants) -> List[dict]:
    """Peak at two batch sizes per variant: the slope is the memory per
    sample, the intercept what the step holds whatever the batch."""
    b1, b2 = (int(b) for b in args.batches.split(","))
    for b in (b1, b2):
        check_batch(args, b, "--batches")
    rows = []
    for name, extra in variants:
        r1, r2 = (_printed(name, probe(args, args.overrides + extra, b, 0.0)) for b in (b1, b2))
        row = {"variant": name, "overrides": extra, "probes": [r1, r2]}
        if "error" not in r1 and "error" not in r2:
            slope = (peak_of(r2, True) - peak_of(r1, True)) / (b2 - b1)
            row.update(per_sample_mb=slope * 1024, fixed_gb=peak_of(r1, True) - slope * b1)
        rows.append(row)
        print(f"  {name}: {json.dumps(row)}", flush=True)
    kind = "CUDA max allocated" if any(p.get("cuda") for r in rows for p in r["probes"]) else "peak RSS"
    print(f"\n== peak memory per sample ({kind}; batches {b1} and {b2}{accumulated(args)}, "
          f"{args.steps} steps each) ==")
    print(f"| variant | steps' peak @ {b1} GiB | steps' peak @ {b2} GiB | per sample MiB | fixed GiB | "
          f"process peak @ {b2} GiB | s/step @ {b2} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "per_sample_mb" not in r:
            err = next(p.get("error") for p in r["probes"] if "error" in p)
            print(f"| {r['variant']} | {err[:100]} | | | | | |")
            continue
        p1, p2 = r["probes"]
        print(f"| {r['variant']} | {peak_of(p1, True):.2f} | {peak_of(p2, True):.2f} | {r['per_sample_mb']:.1f} | "
              f"{r['fixed_gb']:.2f} | {peak_of(p2):.2f} | {p2['seconds_per_step']:.1f} |")
    print("(steps' peak: from the end of the build to the end of the steps; the slope between the two batches is "
          "the memory per sample; process peak: build included)")
    return rows


# --------------------------------------------------------------------------- largest batch


def largest(args, variants) -> List[dict]:
    """The largest per-process batch under ``--cap-gb`` for each variant.
    With ``--micro-batch M`` the search runs over k (batches M x k), the
    bounds and the table in samples all the same."""
    unit = args.micro_batch or 1
    for opt in ("lo", "hi"):
        if getattr(args, opt):
            check_batch(args, getattr(args, opt), "--" + opt)
    rows = []
    for name, extra in variants:
        probes: List[dict] = []
        # In units of the micro-batch: lo fits (0: none known), hi misses (None: none known).
        lo, hi = args.lo // unit, (args.hi // unit) or None

        def run(b: int) -> Optional[bool]:
            if args.max_probes and len(probes) >= args.max_probes:
                return None  # out of probes: resume with --lo/--hi
            r = probe(args, args.overrides + extra, b * unit, args.cap_gb)
            probes.append(r)
            what = f"batch {b * unit}" + (f" ({unit} x {b})" if args.micro_batch else "")
            print(f"  {name} {what}: {'fits' if r['fits'] else 'miss'} "
                  f"(peak {peak_of(r):.2f} GiB, {r['wall_s']} s){'' if r['fits'] else ' ' + r['error'][:200]}",
                  flush=True)
            if not r["fits"] and not r["error"].startswith(("killed", "out of memory")):
                return None  # not a memory miss: stop this variant
            return r["fits"]

        failed = False
        b = lo * 2 if lo else max(1, args.start // unit)
        while hi is None and b <= args.max_batch // unit:  # doubling
            fits = run(b)
            if fits is None:
                failed = True
                break
            if fits:
                lo, b = b, b * 2
            else:
                hi = b
        if hi is not None and not lo and not failed:  # the start missed: halve down
            b = hi // 2
            while b >= 1:
                fits = run(b)
                if fits is None:
                    failed = True
                    break
                if fits:
                    lo = b
                    break
                hi, b = b, b // 2
        while not failed and hi is not None and lo and hi - lo > max(1, int(args.tolerance * lo)):  # bisect
            b = (lo + hi) // 2
            fits = run(b)
            if fits is None:
                failed = True
            elif fits:
                lo = b
            else:
                hi = b
        best = next((p for p in probes if p["batch"] == lo * unit and p["fits"]), None)
        lo, hi = lo * unit, hi * unit if hi is not None else None  # back to samples
        if args.max_probes and len(probes) >= args.max_probes and failed:
            print(f"  {name}: out of probes; resume with --lo {lo} --hi {hi or 0}")
        rows.append({"variant": name, "overrides": extra, "largest_fit": lo, "first_miss": hi,
                     "peak_at_largest_gb": peak_of(best) if best else None,
                     "failed": failed, "probes": probes})
    print(f"\n== largest per-process batch{accumulated(args)} under {args.cap_gb:g} GiB "
          f"({'CUDA allocator cap' if any(p.get('cuda') for r in rows for p in r['probes']) else 'peak RSS'}"
          f", {args.steps} steps per probe) ==")
    print("| variant | overrides | largest batch that fits | smallest that did not | peak at largest GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_at_largest_gb']:.2f}" if r["peak_at_largest_gb"] else "-"
        miss = r["first_miss"] if r["first_miss"] is not None else f"> {args.max_batch} (not probed)"
        note = " (search stopped early)" if r["failed"] else ""
        print(f"| {r['variant']} | {' '.join(r['overrides']) or '-'} | {r['largest_fit']}{note} | {miss} | {peak} |")
    return rows


# --------------------------------------------------------------------------- command line


def accumulated(args) -> str:
    """The tables' note on what a batch is under --micro-batch."""
    return f" accumulated: micro-batches of {args.micro_batch}" if args.micro_batch else ""


def check_batch(args, batch: int, opt: str) -> None:
    if args.micro_batch and batch % args.micro_batch:
        raise SystemExit(f"{opt}: {batch} is not a multiple of --micro-batch {args.micro_batch} (with --micro-batch, "
                         "batches are accumulated per-process batches: micro-batch x train.grad_accum)")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["per-sample", "largest"], nargs="?", default="per-sample")
    p.add_argument("--preset", choices=["tiny", "paper"], default="tiny",
                   help="launch/benchmark.py's presets (paper: the schema's BERT-base + ViT-B-32 with data.mode=jpg)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="", help="default: the preset's")
    p.add_argument("--steps", type=int, default=2, help="micro-steps per probe (2: the second holds AdamW's moments)")
    p.add_argument("--regions", type=int, default=36, help="regions per image (data.mode=regions)")
    p.add_argument("--caption-len", default="12-20", help="tokens per caption, uniform MIN-MAX")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=key=value,key=value (repeatable); default: " + " and ".join(DEFAULT_VARIANTS))
    p.add_argument("--batches", default="2,8", help="per-sample: the two batch sizes")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="fix train.batch_size to this and make every batch of the command the accumulated "
                        "per-process batch (a multiple of it, B = micro-batch x train.grad_accum): each probe "
                        "step runs B / micro-batch micro-batches (cached_step under train.accum_mode=cached)")
    p.add_argument("--cap-gb", type=float, default=6.0, help="largest: the memory cap in GiB")
    p.add_argument("--start", type=int, default=4, help="largest: first batch probed")
    p.add_argument("--lo", type=int, default=0, help="largest: a batch known to fit (resume)")
    p.add_argument("--hi", type=int, default=0, help="largest: a batch known not to fit (resume)")
    p.add_argument("--max-batch", type=int, default=4096, help="largest: never probe above this")
    p.add_argument("--max-probes", type=int, default=0,
                   help="largest: stop after this many probes per variant (0: no limit) and print the bounds to "
                        "resume from with --lo/--hi (keeps each run short)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="largest: stop when the bounds are within this fraction of the fit (0: exact)")
    p.add_argument("--json", default="", help="write the results here (default: $OUT/bench_memory.json if $OUT)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.child:
        child_main(json.loads(args.child))
        return 0
    variants = parse_variants(args.variant or DEFAULT_VARIANTS)
    if args.micro_batch < 0:
        raise SystemExit("--micro-batch: expected a positive micro-batch (0: none)")
    if args.micro_batch and any(kv.startswith(("train.grad_accum=", "train.batch_size="))
                                for kv in args.overrides + [kv for _, extra in variants for kv in extra]):
        raise SystemExit("--micro-batch sets train.batch_size and train.grad_accum itself (the probed batch / "
                         "--micro-batch): drop them from the overrides and variants")
    print(f"preset {args.preset}, precision {args.precision or 'preset'}, overrides {' '.join(args.overrides) or '-'}")
    if args.what == "per-sample":
        results: Dict[str, object] = {"per_sample": per_sample(args, variants)}
    else:
        results = {"largest": largest(args, variants), "cap_gb": args.cap_gb}
    results["argv"] = sys.argv[1:] if argv is None else list(argv)
    path = args.json or (os.path.join(os.environ["OUT"], "bench_memory.json") if os.environ.get("OUT") else "")
    if path:
        from user_dist.atomic import atomic_json

        atomic_json(path, results, default=str)
        print(f"wrote {path}")
    return 0
