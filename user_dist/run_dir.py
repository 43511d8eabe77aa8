"""The run folder: created only once the config is valid, never clobbered.

A fresh start (``train.resume=''``) refuses a run folder that already holds
checkpoints or logs, so a typo in a command line cannot overwrite a run.
"""
from __future__ import annotations

import os

from .checkpoint import latest_checkpoint
from .config import Config, ConfigError, save_config


def run_path(cfg: Config) -> str:
    return os.path.join(cfg.train.run_root, cfg.train.run_name)


def resolve_resume(cfg: Config) -> str:
    """The checkpoint to resume from ('' for a fresh start); raises on conflicts."""
    run_dir = run_path(cfg)
    resume = cfg.train.resume
    if resume == "auto":
        return latest_checkpoint(os.path.join(run_dir, "checkpoints")) or ""
    if resume:
        return resume
    used = [n for n in ("checkpoints", "tb", "train_log.jsonl") if os.path.exists(os.path.join(run_dir, n))]
    if used:
        raise ConfigError(
            f"run folder {run_dir} already holds {', '.join(used)}: refusing to overwrite it. "
            "Continue it with train.resume=auto, or start a new run with train.run_name=<new name>")
    return ""


def prepare(cfg: Config, is_main: bool) -> tuple:
    """Create the run folder (rank 0). Returns ``(run_dir, created)``:
    ``created`` is the topmost folder this call made ('' if the run folder
    existed), so that a job refused at start (a config error found with the
    data or a checkpoint) can leave nothing behind. The config is saved by
    :func:`save_run_config` once the job starts, so a refused resume never
    overwrites the run's ``config.yaml``."""
    run_dir = run_path(cfg)
    created = ""
    if is_main:
        top = os.path.abspath(run_dir)
        while not os.path.isdir(top):  # the highest missing folder: makedirs creates the parents too
            created, top = top, os.path.dirname(top)
        os.makedirs(run_dir, exist_ok=True)
    return run_dir, created


def save_run_config(cfg: Config, run_dir: str) -> None:
    """Save the resolved config as ``run_dir/config.yaml`` (rank 0)."""
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
