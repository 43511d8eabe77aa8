"""Exact resume with a trained BatchNorm backbone on 2 ranks.

Each rank's BatchNorm running statistics average its own batches (DeepSpeed
keeps parameters identical across ranks, not buffers), and in eval mode the
key towers' statistics follow the online ones by EMA, so both differ between
ranks. A resume must give every rank its own back: the engine's checkpoint
holds rank 0's module only. Here real TrainSteps (DeepSpeed engines, gloo,
fp32, ZeRO 0) on 2 forked ranks train, save a real checkpoint, go on; a
fresh TrainStep restores the checkpoint through user_dist.resume and takes
the same steps: losses, keys, queue, weights and statistics must match the
uninterrupted run bit for bit.
"""
import os

import torch

from conftest import run_gloo_ranks

WORLD, B, SAVE_AT, AFTER = 2, 4, 2, 3
OVERRIDES = ["data.mode=jpg", "data.image_size=32", "model.image.backbone=timm:test_resnet", "model.embed_size=32",
             "model.mlp_hidden=16", "model.text.hidden_size=32", "model.text.num_layers=1", "model.text.num_heads=2",
             "model.text.intermediate_size=64", "model.text.vocab_size=2000", "model.gse.kind=sge",
             "queue.size_per_rank=16", f"train.batch_size={B}", "train.precision=fp32", "train.zero_stage=0",
             "train.deterministic=true", "optim.lr=0.01"]


def jpg_batch(step: int, rank: int) -> dict:
    """This rank's decoded-image batch of ``step``: (B, 3, 32, 32) images, captions of 4-8 tokens."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    n_tok = torch.randint(4, 9, (B,), generator=g)
    attention = (torch.arange(8)[None] < n_tok[:, None]).long()
    ids = torch.randint(1000, 2000, (B, 8), generator=g) * attention
    ids[:, 0] = 101
    ids[torch.arange(B), n_tok - 1] = 102
    first = (step * WORLD + rank) * B
    return {"images": torch.randn(B, 3, 32, 32, generator=g) * (1 + rank), "input_ids": ids,
            "attention_mask": attention, "image_ids": torch.arange(first, first + B)}


def _state(step) -> dict:
    """What must continue exactly: online weights and buffers, key towers, queue."""
    module = step.engine.module
    return {"online": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "keys": {k: v.clone() for k, v in step.momentum.state_dict().items()},
            "queue": {k: v.clone() for k, v in step.queue.state_dict().items() if torch.is_tensor(v)}}


def _steps(step, first: int) -> list:
    return [step.micro_step(jpg_batch(n, torch.distributed.get_rank()), step=n)["loss"].item()
            for n in range(first, first + AFTER)]


def _train_save_resume(rank: int, run_dir: str) -> dict:
    """On each rank: SAVE_AT steps, a checkpoint, AFTER more steps; then a
    fresh TrainStep resumed from the checkpoint takes the same AFTER steps."""
    from user_dist import checkpoint as ckpt
    from user_dist import rng
    from user_dist.config import load_config, to_yaml
    from user_dist.plan import BatchLayout
    from user_dist.resume import ResumePlan, restore
    from user_dist.train_step import TrainStep

    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed asks for it (a forked rank: not the test's environment)
    cfg = load_config(None, OVERRIDES)
    rng.seed_rank(cfg.train.seed, rank)
    step = TrainStep(cfg, steps_per_epoch=10, total_steps=10)
    for n in range(SAVE_AT):
        step.micro_step(jpg_batch(n, rank), step=n)
    layout = BatchLayout.of(cfg.train, WORLD)
    meta = ckpt.CheckpointMeta(step=SAVE_AT, epoch=0, step_in_epoch=SAVE_AT, world_size=WORLD,
                               global_batch=layout.global_batch, zero_stage=0,
                               queue_size_per_rank=cfg.queue.size_per_rank, queue_mode=cfg.queue.mode)
    momentum_state, rank_state = step.checkpoint_state()
    path = ckpt.save_checkpoint(run_dir, step.engine, meta=meta, config_yaml=to_yaml(cfg),
                                momentum_state=momentum_state, rank_state=rank_state, keep_last=1)
    at_save = _state(step)
    full = _steps(step, SAVE_AT)
    full_end = _state(step)

    rng.seed_rank(cfg.train.seed + 1, rank)  # a new job: nothing carried over but the checkpoint
    fresh = TrainStep(cfg, steps_per_epoch=10, total_steps=10)
    restore(ResumePlan.make(path, cfg, layout, fresh.zero_stage), fresh, cfg.train, None)
    restored = _state(fresh)
    resumed = _steps(fresh, SAVE_AT)
    return {"at_save": at_save, "restored": restored, "full": full, "resumed": resumed, "full_end": full_end,
            "resumed_end": _state(fresh)}


def _assert_same(a: dict, b: dict, what: str) -> None:
    for part in a:
        assert a[part].keys() == b[part].keys()
        bad = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not bad, f"{what}: {part} differs in {bad[:4]} ({len(bad)} tensors)"


def test_each_rank_resumes_its_own_batchnorm_statistics_and_continues_exactly(tmp_path):
    ranks = run_gloo_ranks(_train_save_resume, WORLD, str(tmp_path), timeout=300)
    stats = [k for k in ranks[0]["at_save"]["online"] if k.endswith("running_mean")]
    assert stats  # a BatchNorm backbone, trained
    # The premise: the ranks' statistics (online and key towers) differ, the weights do not.
    assert not torch.equal(ranks[0]["at_save"]["online"][stats[0]], ranks[1]["at_save"]["online"][stats[0]])
    assert not torch.equal(ranks[0]["at_save"]["keys"][stats[0]], ranks[1]["at_save"]["keys"][stats[0]])
    weight = next(k for k in ranks[0]["at_save"]["online"] if k.endswith("conv1.weight"))
    assert torch.equal(ranks[0]["at_save"]["online"][weight], ranks[1]["at_save"]["online"][weight])
    for r, got in enumerate(ranks):
        _assert_same(got["at_save"], got["restored"], f"rank {r} right after the restore")
    for r, got in enumerate(ranks):
        assert got["resumed"] == got["full"], f"rank {r}: losses after the resume"
        _assert_same(got["full_end"], got["resumed_end"], f"rank {r} after {AFTER} more steps")
