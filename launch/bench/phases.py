"""Where the training step goes: the median time of each of
``TrainStep.PHASES``, each bracketed by device syncs, and the collectives
made inside each phase.

The step times itself: ``micro_step`` enters ``self.clock(name)`` around each
phase (a no-op by default); here the clock is a :class:`PhaseClock`.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from typing import Dict, Iterator, List

import torch

from .comm import CommCounter
from .common import sync
from .step import run_step

OTHER = "other (outside the phases)"


class PhaseClock:
    """``clock(name)``: a context manager that times the phase ``name``
    between two device syncs. ``current`` names the phase running now, so
    that collectives can be attributed to it ("other" outside the phases)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, List[float]] = defaultdict(list)
        self.current = "other"

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync(self.device)
        outer, self.current = self.current, name
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name].append(time.perf_counter() - start)
            self.current = outer


@contextlib.contextmanager
def clocked(step, clock: PhaseClock) -> Iterator[PhaseClock]:
    """The step timed by ``clock`` inside the block; its own clock afterwards."""
    saved, step.clock = step.clock, clock
    try:
        yield clock
    finally:
        step.clock = saved


def breakdown(step, batches: List[dict], steps: int, comm_steps: int = 1) -> Dict[str, object]:
    """Median seconds per phase over ``steps`` synced micro-steps, and the
    time, bytes and calls of the collectives per phase over ``comm_steps``
    further ones (counting them adds Python work to every operator, so it
    stays out of the timed steps; 0: not counted, as torch.compile refuses
    to run under the counter's dispatch mode).

    Phases come in ``TrainStep.PHASES`` order, then any the step clocked that
    the tuple does not name, then the rest of the step (:data:`OTHER`).
    """
    from user_dist.train_step import TrainStep

    totals = []
    with clocked(step, PhaseClock(step.device)) as clock:
        for i in range(steps):
            sync(step.device)
            start = time.perf_counter()
            run_step(step, batches[i % len(batches)])
            sync(step.device)
            totals.append(time.perf_counter() - start)
    names = [p for p in TrainStep.PHASES if p in clock.seconds] + \
            [p for p in clock.seconds if p not in TrainStep.PHASES]
    phases = {p: statistics.median(clock.seconds[p]) for p in names}
    total = statistics.median(totals)
    phases[OTHER] = max(0.0, total - sum(phases.values()))
    out = {"phases": phases, "total": total, "steps": steps, "comm_steps": comm_steps}
    if comm_steps:
        with clocked(step, PhaseClock(step.device)) as where, \
                CommCounter(lambda: where.current, step.device) as comm:
            for i in range(comm_steps):
                run_step(step, batches[(steps + i) % len(batches)])
        out.update(comm_seconds=comm.seconds / comm_steps,
                   comm_bytes={key: n // comm_steps for key, n in comm.bytes.items()},
                   comm_calls={key: n / comm_steps for key, n in comm.calls.items()})
    return out


def print_breakdown(b: Dict[str, object]) -> None:
    print(f"\nwhere the step goes (median of {b['steps']} synced steps, {1e3 * b['total']:.1f} ms):")
    print("| phase | ms | share |\n|---|---|---|")
    for phase, s in b["phases"].items():
        print(f"| {phase} | {1e3 * s:.2f} | {100 * s / b['total']:.1f}% |")
    if not b["comm_steps"]:
        print("| (communication: not counted, train.compile runs no step under the counter) | | |")
        return
    print(f"| (communication, inside the phases above: {sum(b['comm_calls'].values()):.0f} collectives, "
          f"{sum(b['comm_bytes'].values()):,} bytes) | {1e3 * b['comm_seconds']:.2f} | "
          f"{100 * b['comm_seconds'] / b['total']:.1f}% |")
