"""Two micro-steps of TrainStep eager and with ``train.compile=default`` from
the same seed and batches; prints JSON (losses, state keys, compiled modules).

    python tests/scripts/compile_step.py

Used by tests/test_train_step.py (CPU: inductor's C++ backend, about a minute
of compilation).
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "launch"))

import benchmark  # noqa: E402
from user_dist import distributed as du  # noqa: E402
from user_dist.trainer import TrainStep  # noqa: E402

SMALL = ["model.embed_size=32", "model.region_dim=32", "model.mlp_hidden=16", "model.text.hidden_size=32",
         "model.text.num_layers=1", "model.text.num_heads=2", "model.text.intermediate_size=64",
         "model.text.vocab_size=2000", "queue.size_per_rank=16", "train.batch_size=8", "model.text.dropout=0.0",
         "model.gse.sge_dropout=0.0"]


def run(compile_mode: str):
    cfg = benchmark.build_config("tiny", SMALL + [f"train.compile={compile_mode}"], "fp32")
    step = TrainStep(cfg, 10, 10)
    losses = []
    for seed in range(2):
        batch = benchmark.synthetic_batch(cfg, 8, 36, range(5, 9), seed=seed)
        losses.append(float(step.micro_step(batch)["loss"]))
    keys = sorted(step.engine.module.state_dict()) + sorted(step.momentum.state_dict())
    return losses, keys, step


def main():
    du.init_distributed(timeout_s=120)
    # Parameters are not compared: Adam turns float-rounding differences of
    # near-zero gradients into steps of about lr, so losses are the measure.
    eager_losses, eager_keys, _ = run("none")
    comp_losses, comp_keys, step = run("default")
    compiled = [type(m).__name__ for m in step.engine.module.modules() if getattr(m, "_compiled_call_impl", None)]
    print(json.dumps({
        "eager_losses": eager_losses, "compiled_losses": comp_losses,
        "same_state_keys": eager_keys == comp_keys, "compiled_modules": compiled}))


if __name__ == "__main__":
    main()
