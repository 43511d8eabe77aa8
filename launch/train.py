#!/usr/bin/env python
"""Train USER with DeepSpeed data parallelism.

    deepspeed --num_gpus 8 launch/train.py --config configs/coco_region.yaml train.epochs=25
    torchrun --nproc_per_node 2 launch/train.py --config configs/synthetic.yaml
    srun python launch/train.py --config ... (see launch/slurm/train.sbatch)
    python launch/train.py --config configs/synthetic.yaml --print-config
    python launch/train.py --config configs/coco_region.yaml --print-plan --world-size 64 [--json]
    python launch/train.py --list-keys

Any ``key=value`` after the options overrides the config (docs/configuration.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from user_dist.config import ConfigError, DataConfig, describe_schema, load_config, to_yaml, validate  # noqa: E402
from user_dist.distributed import discover, strip_local_rank_arg  # noqa: E402
from user_dist.plan import RunPlan  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Train USER (momentum contrastive image-text retrieval) with DeepSpeed.",
        epilog="Overrides: any number of key=value, e.g. train.epochs=3 queue.size_per_rank=1024. "
               "See --list-keys for every key, its type and default.")
    p.add_argument("--config", help="YAML config (configs/*.yaml); keys override the schema defaults")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (what the ranks of this launch, or of --world-size N, run) "
                        "and exit; it loads back with --config")
    p.add_argument("--list-keys", action="store_true", help="list every config key with type and default")
    p.add_argument("--print-plan", action="store_true",
                   help="print what a job would run (per-rank and global batch and pool, lr, momentum, steps) "
                        "and exit; needs no data or GPU")
    p.add_argument("--world-size", type=int, default=0, metavar="N",
                   help="with --print-plan / --print-config: for N ranks (default: this launch's)")
    p.add_argument("--train-pairs", type=int, default=0, metavar="N",
                   help="with --print-plan: (image, caption) pairs per epoch, when the shards are not at hand")
    p.add_argument("--json", action="store_true", help="with --print-plan: print JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def train_pairs(data: DataConfig, strict: bool):
    """(image, caption) pairs of one training epoch (user_dist.data.epoch_pairs). Not strict (a dry
    run): None when the training data cannot be resolved (no shards at hand, a count missing)."""
    from user_dist.data import epoch_pairs
    from user_dist.data_format import ShardError

    try:
        return epoch_pairs(data)
    except (ShardError, ConfigError, OSError):
        if strict:
            raise
        return None


def main(argv=None) -> int:
    argv = strip_local_rank_arg(sys.argv[1:] if argv is None else list(argv))
    args = parse_args(argv)
    if args.list_keys:
        for key, typ, default in describe_schema():
            print(f"{key:38s} {typ:12s} {default!r}")
        return 0
    dry = args.print_config or args.print_plan
    try:
        cfg = load_config(args.config, args.overrides)
        source = args.config or "default value"
        validate(cfg, check_paths=not dry, sources={"data.train_shards": source, "data.val_shards": source})
        world = args.world_size or discover().world_size
        if world < 1:
            raise ConfigError(f"--world-size must be at least 1, got {world}")
        plan = RunPlan.make(cfg, world, args.train_pairs or train_pairs(cfg.data, strict=not dry))
        if not dry:
            from user_dist.data import check_model_fits

            check_model_fits(cfg.data, cfg.model)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(plan.resolve(cfg)))
        return 0
    if args.print_plan:
        print(json.dumps(plan.as_dict(), indent=1) if args.json else plan.table())
        return 0
    cfg = plan.resolve(cfg)  # what this job's ranks run: per-rank sizes, scaled lr and momentum

    from user_dist import distributed as du
    from user_dist import run_dir as rd
    from user_dist.monitor import setup_logging

    try:
        resume_from = rd.resolve_resume(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    env = du.init_distributed(cfg.train.dist_timeout_s)
    setup_logging(env.rank)
    import logging

    log = logging.getLogger("user_dist")
    run_dir, created = rd.prepare(cfg, du.is_main())
    if du.is_main():
        log.info("run folder: %s (TensorBoard: tensorboard --logdir %s)", run_dir, os.path.join(run_dir, "tb"))
        log.info("world size %d (%s launcher), device %s\n%s", env.world_size, env.launcher,
                 du.device_for(env.local_rank), to_yaml(cfg))
        log.info("run plan (launch/train.py --print-plan shows it beforehand):\n%s", plan.table())

    from user_dist.checkpoint import CheckpointSaveError, ResumeError
    from user_dist.faults import Faults
    from user_dist.trainer import Trainer

    try:
        # USER_DIST_FAULT_*: the tests' fault hooks, read here and nowhere else.
        trainer = Trainer(cfg, run_dir, resume_from, faults=Faults.from_env(os.environ, env.rank))
    except (ConfigError, ResumeError) as exc:
        # Every rank finds these alike: the data layout, a checkpoint that cannot
        # continue here (ConfigError), a checkpoint file that would run code, or a
        # conversion for another number of ranks that failed or would not fit
        # (ResumeError). Nothing but the folder was written: a refused job leaves
        # no run behind. Removed before the message, since a launcher may end
        # this rank once another has exited.
        if created:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(exc, ConfigError):
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        log.error("%s", exc)
        return 1
    if du.is_main():
        try:
            rd.save_run_config(cfg, run_dir)
        except OSError as exc:  # a full disk: every checkpoint carries the config too, so train on
            log.warning("could not save %s: %s; every checkpoint holds the config as well",
                        os.path.join(run_dir, "config.yaml"), exc)
    try:
        pos = trainer.fit()
    except FloatingPointError as exc:  # every rank agrees on it (the finiteness flag is all-reduced)
        log.error("%s", exc)
        return 1
    except CheckpointSaveError as exc:  # a full disk: every rank (free space), or the one whose write failed
        log.error("%s", exc)
        return 1
    finally:
        trainer.close()
    log.info("done: step %d, epoch %d, %d non-finite steps skipped", pos.step, pos.epoch,
             pos.skipped_nonfinite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
