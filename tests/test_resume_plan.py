"""ResumePlan: what a resume loads and changes, decided from a checkpoint's
meta alone, before any engine is built (user_dist.resume)."""
import json

import pytest

from user_dist.checkpoint import CheckpointMeta
from user_dist.config import ConfigError, load_config
from user_dist.plan import BatchLayout
from user_dist.resume import ResumePlan


def saved_checkpoint(tmp_path, **layout):
    """A complete checkpoint folder as far as planning reads it: COMPLETE and meta.json."""
    fields = dict(step=14, epoch=1, step_in_epoch=2, world_size=2, global_batch=48, zero_stage=0,
                  queue_size_per_rank=64, queue_mode="replicated")
    fields.update(layout)
    folder = tmp_path / "step_00000014"
    folder.mkdir()
    CheckpointMeta(**fields).write(str(folder))
    (folder / "COMPLETE").write_text(json.dumps({"step": 14}))
    return str(folder)


def plan_for(path, world, batch, accum=1, zero=0, queue=("64", "replicated")):
    cfg = load_config(None, [f"train.batch_size={batch}", f"train.grad_accum={accum}", f"train.zero_stage={zero}",
                             f"queue.size_per_rank={queue[0]}", f"queue.mode={queue[1]}"])
    return ResumePlan.make(path, cfg, BatchLayout.of(cfg.train, world), zero)


def test_the_same_ranks_and_layout_load_everything_as_saved(tmp_path):
    plan = plan_for(saved_checkpoint(tmp_path), world=2, batch=24)
    assert (plan.reshard, plan.universal, plan.queue_relayout) == (False, False, False)
    assert plan.saved.step == 14


def test_another_queue_size_on_the_same_ranks_lays_the_pool_out_afresh(tmp_path):
    plan = plan_for(saved_checkpoint(tmp_path), world=2, batch=24, queue=("128", "sharded"))
    assert (plan.reshard, plan.queue_relayout) == (False, True)


@pytest.mark.parametrize("zero, universal", [(0, False), (2, True)])
def test_other_ranks_with_the_same_global_batch_reshard(tmp_path, zero, universal):
    plan = plan_for(saved_checkpoint(tmp_path, zero_stage=zero), world=1, batch=24, accum=2, zero=zero)
    assert (plan.reshard, plan.universal, plan.queue_relayout) == (True, universal, True)


def test_other_ranks_with_another_global_batch_are_refused_with_the_batch_to_set(tmp_path):
    with pytest.raises(ConfigError, match=r"global batch of 48; this job has 1 ranks x train.batch_size 24 x "
                                          r"train.grad_accum 1 = 24.*train.batch_size=48"):
        plan_for(saved_checkpoint(tmp_path), world=1, batch=24)


@pytest.mark.parametrize("saved, mine", [(0, 2), (2, 0)])
def test_zero_0_and_zero_1_2_do_not_continue_each_other_on_other_ranks(tmp_path, saved, mine):
    with pytest.raises(ConfigError, match=f"ZeRO stage {saved}; this job has 1 ranks and ZeRO stage {mine}"):
        plan_for(saved_checkpoint(tmp_path, zero_stage=saved), world=1, batch=48, zero=mine)


def test_an_incomplete_checkpoint_is_refused_before_anything_is_built(tmp_path):
    path = saved_checkpoint(tmp_path)
    (tmp_path / "step_00000014" / "COMPLETE").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        plan_for(path, world=2, batch=24)
