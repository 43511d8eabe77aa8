"""The run plan (user_dist.plan): a recipe stated globally means the same on
any number of ranks, the scaling rules do what they say, and
`launch/train.py --print-plan` shows it without data or a GPU."""
import json
import math
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT, child_env
from user_dist.config import ConfigError, load_config
from user_dist.plan import RunPlan

COCO = os.path.join(ROOT, "configs", "coco_region.yaml")
COCO_PAIRS = 5 * 113_287


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_the_shipped_coco_config_trains_the_papers_recipe_on_any_number_of_ranks(world):
    plan = RunPlan.make(load_config(COCO), world, COCO_PAIRS)
    assert (plan.global_batch, plan.global_pool, plan.per_rank_batch * world) == (128, 4096, 128)
    assert (plan.lr, plan.momentum, plan.pool_age_steps, plan.warmup_steps) == (5e-4, 0.999, 32.0, 0)
    assert plan.steps_per_epoch == COCO_PAIRS // 128 and plan.total_steps == 25 * (COCO_PAIRS // 128)
    assert not plan.batch_grows and not plan.pool_grows


def test_per_rank_keys_keep_the_old_meaning_and_say_so():
    plan = RunPlan.make(load_config(None, ["train.batch_size=64", "queue.size_per_rank=1024"]), 4)
    assert (plan.per_rank_batch, plan.global_batch, plan.global_pool) == (64, 256, 4096)
    assert plan.batch_grows and plan.pool_grows and plan.steps_per_epoch is None
    assert any("grows with the ranks" in n for n in plan.notes)


def test_a_global_batch_that_does_not_divide_names_the_key_and_what_would():
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(128\) does not divide over 512 ranks.*use "
                                          r"512 or 1024"):
        RunPlan.make(load_config(COCO), 512)
    with pytest.raises(ConfigError, match=r"queue.global_size \(4096\) does not divide over 3 ranks; use 4095 or "
                                          r"4098"):
        RunPlan.make(load_config(COCO, ["train.global_batch_size=129"]), 3)


def test_a_pool_smaller_than_a_ranks_batch_is_refused():
    with pytest.raises(ConfigError, match="fewer than its batch of 64.*queue.global_size to at least 128"):
        RunPlan.make(load_config(COCO, ["queue.global_size=64"]), 2)


def test_setting_a_global_size_and_its_per_rank_key_together_is_refused():
    with pytest.raises(ConfigError, match="'train.batch_size' is set together with train.global_batch_size"):
        load_config(COCO, ["train.batch_size=64"])
    with pytest.raises(ConfigError, match="'queue.size_per_rank' is set together with queue.global_size"):
        load_config(COCO, ["queue.size_per_rank=64"])


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 8.0), ("sqrt", math.sqrt(8.0))])
def test_the_lr_follows_the_global_batch_by_the_chosen_rule(rule, factor):
    cfg = load_config(COCO, ["train.global_batch_size=1024", f"optim.scale_rule={rule}"])
    plan = RunPlan.make(cfg, 8, COCO_PAIRS)
    assert plan.lr == pytest.approx(5e-4 * factor) and plan.text_lr == pytest.approx(5e-5 * factor)
    # A raised lr gets a warmup of one epoch; an explicit optim.warmup_steps wins.
    assert plan.warmup_steps == (plan.steps_per_epoch if factor > 1 else 0)
    assert RunPlan.make(load_config(COCO, ["train.global_batch_size=1024", f"optim.scale_rule={rule}",
                                           "optim.warmup_steps=7"]), 8, COCO_PAIRS).warmup_steps == 7


def test_the_momentum_horizon_rule_keeps_the_ema_span_in_samples():
    cfg = load_config(COCO, ["train.global_batch_size=1024", "queue.momentum_rule=horizon"])
    plan = RunPlan.make(cfg, 8)
    # The weight of the keys' oldest contributions after S samples is the same at both batches:
    # m_eff ** (S / 1024) == m ** (S / 128).
    samples = 1_000_000
    assert plan.momentum ** (samples / 1024) == pytest.approx(0.999 ** (samples / 128), rel=1e-9)


@pytest.mark.parametrize("rule, pool, age", [("samples", 4096, 4.0), ("steps", 32768, 32.0)])
def test_the_pool_is_sized_in_samples_or_in_steps(rule, pool, age):
    plan = RunPlan.make(load_config(COCO, ["train.global_batch_size=1024", f"queue.size_rule={rule}"]), 8)
    assert (plan.global_pool, plan.pool_age_steps, plan.per_rank_queue) == (pool, age, pool // 8)


def test_a_resolved_config_is_what_a_rank_runs_and_resolving_again_changes_nothing():
    cfg = load_config(COCO, ["train.global_batch_size=1024", "optim.scale_rule=linear",
                             "queue.momentum_rule=horizon", "queue.size_rule=steps"])
    plan = RunPlan.make(cfg, 8, COCO_PAIRS)
    run = plan.resolve(cfg)
    assert (run.train.batch_size, run.queue.size_per_rank, run.optim.lr, run.queue.momentum,
            run.optim.warmup_steps) == (128, 4096, plan.lr, plan.momentum, plan.steps_per_epoch)
    again = RunPlan.make(run, 8, COCO_PAIRS)
    assert again.resolve(run) == run
    assert (again.global_batch, again.global_pool, again.lr, again.momentum) == (1024, 32768, plan.lr,
                                                                                 plan.momentum)


def test_print_plan_needs_no_data_and_gives_the_documented_json(tmp_path):
    missing = str(tmp_path / "no-shards")
    out = subprocess.run([PYTHON, os.path.join(ROOT, "launch", "train.py"), "--config", COCO, "--print-plan",
                          "--world-size", "8", "--json", f"data.train_shards={missing}",
                          f"data.val_shards={missing}"],
                         env=child_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert {"world_size", "per_rank_batch", "global_batch", "per_rank_queue", "global_pool", "lr", "momentum",
            "steps_per_epoch"} <= plan.keys()
    assert (plan["world_size"], plan["per_rank_batch"], plan["global_batch"], plan["global_pool"]) == (8, 16, 128,
                                                                                                       4096)
    assert plan["steps_per_epoch"] is None  # no shards at hand
    table = subprocess.run([PYTHON, os.path.join(ROOT, "launch", "train.py"), "--config", COCO, "--print-plan",
                            "--world-size", "8", "--train-pairs", str(COCO_PAIRS)],
                           env=child_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert table.returncode == 0 and "steps per epoch       4,425" in table.stdout
