"""What a running job shows: a progress line, a JSONL log and TensorBoard.

Only rank 0 writes; other ranks get a :class:`Monitor` whose methods do
nothing, so call sites need no rank checks (and no log spam from N ranks).
Scalars arrive as tensors and are turned into numbers only every
``log_every`` steps, so the training step itself never waits on the host.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Dict, Optional

import torch

log = logging.getLogger("user_dist")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO to stderr; other ranks only warnings and errors."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Monitor:
    """TensorBoard scalars/text, a JSONL log and a progress line (rank 0 only)."""

    def __init__(self, run_dir: Optional[str], enabled: bool, total_steps: int):
        self.enabled = enabled and run_dir is not None
        self.total_steps = total_steps
        self.writer = None
        self.jsonl = None
        self._t0 = time.time()
        self._first_step: Optional[int] = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
            path = os.path.join(run_dir, "train_log.jsonl")
            # A line cut short (a full disk, a kill mid-write) must not swallow the next run's first line.
            cut = os.path.isfile(path) and os.path.getsize(path) > 0 and not _ends_with_newline(path)
            self.jsonl = open(path, "a")
            if cut:
                self.jsonl.write("\n")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        """Log numbers (already on the host) under their tags."""
        if not self.enabled:
            return
        if self.writer is not None:
            try:
                for tag, v in values.items():
                    self.writer.add_scalar(tag, v, step)
            except OSError as exc:  # its writer thread's error (a full disk), raised here
                self._tb_failed(exc)
        if self.jsonl is None:
            return
        try:
            self.jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
            self.jsonl.flush()
        except OSError as exc:
            # A full disk: training goes on (the next checkpoint checks the free
            # space itself and stops the job cleanly); the log says so once.
            log.error("%s: %s; train_log.jsonl stops here (the progress lines go on)",
                      self.jsonl.name, exc)
            self._close_jsonl()

    def progress(self, step: int, epoch: int, values: Dict[str, float]) -> None:
        """One progress line: step, epoch, loss, lr, samples/s, ETA."""
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step, self._t0 = step, time.time()
            rate = 0.0
        else:
            rate = (step - self._first_step) / max(1e-9, time.time() - self._t0)
        eta = _fmt_eta((self.total_steps - step) / rate) if rate > 0 else "?"
        log.info("step %d/%d epoch %d | loss %.4f | lr %.2e | %.1f samples/s | ETA %s", step, self.total_steps,
                 epoch, values.get("train/loss", float("nan")), values.get("lr/group0", float("nan")),
                 values.get("perf/samples_per_s", 0.0), eta)

    def flush(self) -> None:
        if self.writer:
            try:
                self.writer.flush()
            except OSError as exc:
                self._tb_failed(exc)

    def close(self) -> None:
        if self.writer:
            try:
                self.writer.close()
            except OSError as exc:
                self._tb_failed(exc)
        self._close_jsonl()

    def _tb_failed(self, exc: OSError) -> None:
        """TensorBoard's writer failed (a full disk): say so once, log on without it."""
        log.error("TensorBoard events under %s: %s; TensorBoard logging stops here (train_log.jsonl and the "
                  "progress lines go on)", self.writer.log_dir, exc)
        writer, self.writer = self.writer, None
        try:
            writer.close()
        except OSError:
            pass

    def _close_jsonl(self) -> None:
        if self.jsonl is None:
            return
        try:
            self.jsonl.close()
        except OSError:  # its buffer could not be written either (full disk): already reported
            pass
        self.jsonl = None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def to_host(stats: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """One device->host copy for all scalars (a single sync point)."""
    if not stats:
        return {}
    keys = list(stats)
    vals = torch.stack([stats[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
    return dict(zip(keys, vals))
