"""A tiny real DeepSpeed job that saves user-dist checkpoints in a loop.

    torchrun --nproc_per_node 2 tests/scripts/ckpt_engine.py RUN_DIR N_SAVES [--resume] [--no-space-check]

Prints "saved <step>" after each complete save (rank 0), so a test can kill
it with SIGKILL at any moment and check what is left on disk.
``--no-space-check`` turns off the free-space check before each save, so
that a full disk fails the writes themselves (the second line of defence).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from user_dist import checkpoint as ckpt  # noqa: E402
from user_dist import distributed as du  # noqa: E402
from user_dist.config import load_config  # noqa: E402
from user_dist.deepspeed_config import derive  # noqa: E402


def main():
    run_dir, n = sys.argv[1], int(sys.argv[2])
    resume = "--resume" in sys.argv
    if "--no-space-check" in sys.argv:
        ckpt.check_free_space = lambda *args, **kwargs: None
    import deepspeed

    du.init_distributed(timeout_s=60)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = load_config(None, ["train.batch_size=4", "queue.size_per_rank=4", f"train.zero_stage={os.environ.get('ZERO', 0)}",
                             f"train.precision={os.environ.get('PRECISION', 'fp32')}"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=derive(cfg, du.world_size()))
    start = 0
    if resume:
        path = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
        ckpt.load_checkpoint(path, engine)
        start = ckpt.CheckpointMeta.read(path).step
        assert ckpt.load_rank_state(path, du.rank())["queue"]["owner"] == du.rank()
        print(f"resumed {start}", flush=True)
    g = torch.Generator().manual_seed(1 + du.rank())
    for step in range(start + 1, start + n + 1):
        x = torch.randn(4, 8, generator=g)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        meta = ckpt.CheckpointMeta(step=step, epoch=0, step_in_epoch=step, world_size=du.world_size(),
                                   global_batch=4 * du.world_size(), zero_stage=engine.zero_optimization_stage(),
                                   queue_size_per_rank=4, queue_mode="replicated")
        ckpt.save_checkpoint(run_dir, engine, meta=meta,
                             config_yaml="train: {}\n", momentum_state={"w": torch.full((3,), float(step))},
                             rank_state={"queue": {"owner": du.rank(), "step": step}}, keep_last=2)
        if du.is_main():
            print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main()
