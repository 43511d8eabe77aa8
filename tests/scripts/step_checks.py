"""TrainStep checks that need a process group, run as a script; prints JSON.

    python tests/scripts/step_checks.py clip      # own gradient clipping vs DeepSpeed's
    python tests/scripts/step_checks.py compile   # train.compile=default vs eager (about a minute of inductor)

Used by tests/test_train_step.py: DeepSpeed engines want a process group,
which the pytest process should not hold. World 1, fp32, no dropout.
"""
import json
import os
import sys

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


def build(overrides, deepspeed_clips: bool = False) -> trainer.TrainStep:
    cfg = benchmark.build_config("tiny", SMALL + overrides, "fp32")
    saved = trainer.take_clipping
    if deepspeed_clips:
        trainer.take_clipping = lambda ds: 0.0  # leave the clipping in DeepSpeed's config
    try:
        return trainer.TrainStep(cfg, 10, 10)
    finally:
        trainer.take_clipping = saved


def batch(step: trainer.TrainStep, seed: int) -> dict:
    return benchmark.synthetic_batch(step.cfg, 8, 36, range(5, 9), seed=seed)


def params(step: trainer.TrainStep) -> dict:
    return {n: p.detach().clone() for n, p in step.engine.module.named_parameters()}


def clip_check() -> dict:
    """One step clipped by the step itself, by DeepSpeed, and not at all."""
    steps, after, stats = {}, {}, {}
    for name, clip, ds in (("own", 0.05, False), ("deepspeed", 0.05, True), ("none", 0.0, False)):
        steps[name] = build([f"optim.grad_clip={clip}", "optim.lr=0.01"], deepspeed_clips=ds)
        before = params(steps[name])
        stats[name] = steps[name].micro_step(batch(steps[name], 0), grad_norm=True)
        after[name] = params(steps[name])

    def gap(a, b):
        return max(float((a[n] - b[n]).abs().max()) for n in a)

    own, ds = steps["own"], steps["deepspeed"]
    return {"own_clip": own._clip, "deepspeed_clip": ds._clip,
            "own_ds_gradient_clipping": own.engine.gradient_clipping(),
            "ds_ds_gradient_clipping": ds.engine.gradient_clipping(),
            "backward_allreduce": own.engine.enable_backward_allreduce,
            "grad_norm": float(stats["own"]["grad_norm"]),
            "max_param_diff_own_vs_deepspeed": gap(after["own"], after["deepspeed"]),
            "max_param_move": gap(after["deepspeed"], before),
            "max_param_diff_clipped_vs_unclipped": gap(after["own"], after["none"])}


def compile_check() -> dict:
    """Two steps eager and compiled. Parameters are not compared: Adam turns
    float-rounding differences of near-zero gradients into steps of about
    lr, so the losses (the second one after an update) are the measure."""
    out = {}
    for mode in ("none", "default"):
        step = build([f"train.compile={mode}"])
        out[f"{mode}_losses"] = [float(step.micro_step(batch(step, s))["loss"]) for s in range(2)]
        out[f"{mode}_keys"] = sorted(step.engine.module.state_dict()) + sorted(step.momentum.state_dict())
    out["same_state_keys"] = out.pop("none_keys") == out.pop("default_keys")
    out["compiled_modules"] = [type(m).__name__ for m in step.engine.module.modules()
                               if getattr(m, "_compiled_call_impl", None)]
    return out


def main():
    du.init_distributed(timeout_s=120)
    print(json.dumps({"clip": clip_check, "compile": compile_check}[sys.argv[1]]()))


if __name__ == "__main__":
    main()
