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


def prepare(cfg: Config, is_main: bool) -> str:
    """Create the run folder and save the resolved config (rank 0)."""
    run_dir = run_path(cfg)
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    return run_dir
