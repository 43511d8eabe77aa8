"""One TrainStep micro-step with gradient clipping done by the step itself
and, in a second engine built from the same seed, by DeepSpeed; prints JSON.

    python tests/scripts/clip_step.py     (world 1: initialises its own process group)

Used by tests/test_train_step.py; a script because DeepSpeed engines want a
process group, which the pytest process should not hold.
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "launch"))

import benchmark  # noqa: E402
from user_dist import distributed as du  # noqa: E402
from user_dist import trainer  # noqa: E402

SMALL = ["model.embed_size=32", "model.region_dim=32", "model.mlp_hidden=16", "model.text.hidden_size=32",
         "model.text.num_layers=1", "model.text.num_heads=2", "model.text.intermediate_size=64",
         "model.text.vocab_size=2000", "queue.size_per_rank=16", "train.batch_size=8", "model.text.dropout=0.0",
         "model.gse.sge_dropout=0.0"]


def one_step(clip: float, deepspeed_clips: bool):
    cfg = benchmark.build_config("tiny", SMALL + [f"optim.grad_clip={clip}", "optim.lr=0.01"], "fp32")
    saved = trainer.take_clipping
    if deepspeed_clips:
        trainer.take_clipping = lambda ds: 0.0  # leave the clipping in DeepSpeed's config
    try:
        step = trainer.TrainStep(cfg, 10, 10)
    finally:
        trainer.take_clipping = saved
    before = {n: p.detach().clone() for n, p in step.engine.module.named_parameters()}
    batch = benchmark.synthetic_batch(cfg, 8, 36, range(5, 9), seed=0)
    stats = step.micro_step(batch, grad_norm=True)
    after = {n: p.detach().clone() for n, p in step.engine.module.named_parameters()}
    return step, before, after, stats


def main():
    du.init_distributed(timeout_s=120)
    own, before, own_after, own_stats = one_step(0.05, deepspeed_clips=False)
    ds, _, ds_after, _ = one_step(0.05, deepspeed_clips=True)
    _, _, free_after, _ = one_step(0.0, deepspeed_clips=False)
    diff = max(float((own_after[n] - ds_after[n]).abs().max()) for n in own_after)
    moved = max(float((ds_after[n] - before[n]).abs().max()) for n in own_after)
    unclipped_gap = max(float((own_after[n] - free_after[n]).abs().max()) for n in own_after)
    print(json.dumps({
        "own_clip": own._clip, "deepspeed_clip": ds._clip,
        "own_ds_gradient_clipping": own.engine.gradient_clipping(),
        "ds_ds_gradient_clipping": ds.engine.gradient_clipping(),
        "backward_allreduce": own.engine.enable_backward_allreduce,
        "grad_norm": float(own_stats["grad_norm"]),
        "max_param_diff_own_vs_deepspeed": diff, "max_param_move": moved,
        "max_param_diff_clipped_vs_unclipped": unclipped_gap}))


if __name__ == "__main__":
    main()
