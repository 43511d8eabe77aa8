"""Learning-rate schedules and the DeepSpeed config derived from the YAML config."""
import json
import math

import pytest
import torch

from user_dist.config import ConfigError, OptimConfig, load_config
from user_dist.deepspeed_config import derive, with_user_override
from user_dist.schedule import build_scheduler, lr_multiplier


def test_step_schedule_decays_at_the_given_epochs():
    cfg = OptimConfig(schedule="step", decay_epochs=[2, 4], decay_factor=0.1)
    got = [lr_multiplier(s, cfg, steps_per_epoch=10, total_steps=60) for s in (0, 19, 20, 39, 40, 59)]
    assert got == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_warmup_is_linear_then_the_schedule_applies():
    cfg = OptimConfig(schedule="step", decay_epochs=[100], warmup_steps=4)
    assert [lr_multiplier(s, cfg, 10, 100) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_cosine_goes_from_peak_to_min_ratio():
    cfg = OptimConfig(schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg, 10, 100) == pytest.approx(1.0)
    assert lr_multiplier(50, cfg, 10, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, cfg, 10, 100) == pytest.approx(0.1)


def test_scheduler_keeps_the_groups_lr_ratio():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr": 1e-3}, {"params": [p2], "lr": 1e-4}])
    sched = build_scheduler(opt, OptimConfig(schedule="step", decay_epochs=[1], decay_factor=0.5), 2, 10)
    for _ in range(2):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-5])


def test_deepspeed_config_is_derived_from_the_yaml_config():
    cfg = load_config(None, ["train.batch_size=32", "train.grad_accum=2", "train.zero_stage=1",
                             "train.precision=bf16", "optim.grad_clip=2.0"])
    ds = derive(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32 * 2 * 4
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 2.0


def test_user_deepspeed_json_overrides_with_a_diff(tmp_path):
    cfg = load_config(None, ["train.zero_stage=0"])
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}}))
    merged, diff = with_user_override(derive(cfg, 1), str(p))
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["train_micro_batch_size_per_gpu"] == cfg.train.batch_size
    assert "zero_optimization.stage: 0 -> 2" in diff
    assert "zero_optimization.overlap_comm: '<unset>' -> True" in diff


def test_unreadable_deepspeed_json_is_a_config_error(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=str(p)):
        with_user_override({}, str(p))
