"""TrainStep checks that need a process group, run as a script; prints JSON.

    python tests/scripts/step_checks.py clip      # own gradient clipping vs DeepSpeed's
    python tests/scripts/step_checks.py compile   # train.compile=default vs eager (about a minute of inductor)
    python tests/scripts/step_checks.py nonfinite # a NaN step skipped on the device, and on the host (ZeRO 1)

Used by tests/test_train_step.py: DeepSpeed engines want a process group,
which the pytest process should not hold. World 1, fp32, no dropout.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from launch.bench.common import build_config, synthetic_batch  # noqa: E402
from user_dist import distributed as du  # noqa: E402
from user_dist import train_step as trainer  # noqa: E402
from user_dist.faults import Faults  # noqa: E402
from user_dist.nonfinite import DeviceSkips  # noqa: E402

SMALL = ["model.embed_size=32", "model.region_dim=32", "model.mlp_hidden=16", "model.text.hidden_size=32",
         "model.text.num_layers=1", "model.text.num_heads=2", "model.text.intermediate_size=64",
         "model.text.vocab_size=2000", "queue.size_per_rank=16", "train.batch_size=8", "model.text.dropout=0.0",
         "model.gse.sge_dropout=0.0"]


def build(overrides, deepspeed_clips: bool = False) -> trainer.TrainStep:
    cfg = build_config("tiny", SMALL + overrides, "fp32")
    saved = trainer.take_clipping
    if deepspeed_clips:
        trainer.take_clipping = lambda ds: 0.0  # leave the clipping in DeepSpeed's config
    try:
        return trainer.TrainStep(cfg, 10, 10, faults=Faults())
    finally:
        trainer.take_clipping = saved


def batch(step: trainer.TrainStep, seed: int) -> dict:
    return synthetic_batch(step.cfg, 8, 36, range(5, 9), seed=seed)


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
    return {"own_clip": own.clip, "deepspeed_clip": ds.clip,
            "own_ds_gradient_clipping": own.engine.gradient_clipping(),
            "ds_ds_gradient_clipping": ds.engine.gradient_clipping(),
            "backward_allreduce": own.engine.enable_backward_allreduce,
            "grad_norm": float(stats["own"]["grad_norm"]),
            "max_param_diff_own_vs_deepspeed": gap(after["own"], after["deepspeed"]),
            "max_param_move": gap(after["deepspeed"], before),
            "max_param_diff_clipped_vs_unclipped": gap(after["own"], after["none"])}


def compile_check() -> dict:
    """Three steps eager and compiled (towers and loss). Parameters are not
    compared: Adam turns float-rounding differences of near-zero gradients
    into steps of about lr, so the losses (the later ones after updates) and
    the gradient norms are the measure."""
    out = {}
    for mode in ("none", "default"):
        step = build([f"train.compile={mode}"])
        # Three steps: the queue (16 slots, 8 keys a step) is empty, half full, full.
        stats = [step.micro_step(batch(step, s), grad_norm=True) for s in range(3)]
        out[f"{mode}_losses"] = [float(st["loss"]) for st in stats]
        out[f"{mode}_grad_norms"] = [float(st["grad_norm"]) for st in stats]
        out[f"{mode}_loss_queue"] = [float(st["loss_queue"]) for st in stats]
        out[f"{mode}_keys"] = sorted(step.engine.module.state_dict()) + sorted(step.momentum.state_dict())
    out["same_state_keys"] = out.pop("none_keys") == out.pop("default_keys")
    out["compiled_modules"] = [type(m).__name__ for m in step.engine.module.modules()
                               if getattr(m, "_compiled_call_impl", None)]
    return out


def adam_state(step: trainer.TrainStep) -> dict:
    opt = step.engine.optimizer
    return {f"{i}.{k}": v.detach().clone() for i, p in enumerate(step.params)
            for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}


def queue_state(step: trainer.TrainStep) -> dict:
    q = step.queue
    return {"image": q.image.clone(), "text": q.text.clone(), "ids": q.ids.clone()}


class _NoHostReads:
    """Make every read of a tensor's value by the host raise, for a while."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for n in self.NAMES:
            def refuse(t, *a, _n=n, **k):
                raise AssertionError(f"host read Tensor.{_n} in the step")
            setattr(torch.Tensor, n, refuse)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def nonfinite_check() -> dict:
    """A step whose loss is NaN (the fault hook), skipped on the device: the
    parameters, the Adam moments and step counts, and the queue slots stay as
    they were; the counts see it; the next step trains. And with ZeRO 1 the
    host-side check returns None."""
    step = build(["optim.lr=0.01", "optim.grad_clip=1.0"])
    out = {"device_skips": isinstance(step.skips, DeviceSkips),
           "optimizer_is_ours": type(step.engine.optimizer).__name__}
    step.micro_step(batch(step, 0), step=0)
    p0, a0, q0, ptr0 = params(step), adam_state(step), queue_state(step), step.queue.ptr
    step.faults.nan = {1: 1}
    b = batch(step, 1)
    with _NoHostReads():  # the whole skipped step runs without the host waiting for the device
        stats = step.micro_step(b, step=1, grad_norm=True)
    out["skipped_loss_finite"] = bool(torch.isfinite(stats["loss"]))
    out["params_unchanged"] = all(torch.equal(p0[n], v) for n, v in params(step).items())
    a1 = adam_state(step)
    out["adam_unchanged"] = a0.keys() == a1.keys() and all(torch.equal(a0[k], a1[k]) for k in a0)
    out["adam_keys"] = sorted({k.split(".", 1)[1] for k in a0})
    out["queue_unchanged"] = all(torch.equal(q0[k], v) for k, v in queue_state(step).items())
    out["queue_ptr_moved_by"] = (step.queue.ptr - ptr0) % step.queue.pool_size
    out["counts_after_skip"] = step.skips.counts.tolist()
    out["momentum_finite"] = all(bool(torch.isfinite(t).all()) for t in step.momentum.state_dict().values()
                                 if t.is_floating_point())
    stats = step.micro_step(batch(step, 2), step=2)
    out["next_loss_finite"] = bool(torch.isfinite(stats["loss"]))
    out["next_step_moves"] = max(float((params(step)[n] - p0[n]).abs().max()) for n in p0)
    out["counts_after_next"] = step.skips.counts.tolist()
    out["queue_ids_after_next"] = int((step.queue.ids >= 0).sum())
    out.update(nan_input_check())
    host = build(["optim.lr=0.01", "train.zero_stage=1"])
    host.faults.nan = {0: 1}
    out["zero1_device_skips"] = isinstance(host.skips, DeviceSkips)
    out["zero1_returns"] = repr(host.micro_step(batch(host, 0), step=0))
    return out


def norm_buffers(module: torch.nn.Module) -> dict:
    return {n: b.detach().clone() for n, b in module.named_buffers() if ".running_" in n}


def nan_input_check() -> dict:
    """A NaN in one region feature (not in the loss): the step is skipped and
    the BatchNorm running statistics keep their values, so the key towers
    (their EMA) and evaluation stay finite and the next step trains."""
    step = build(["optim.lr=0.01", "optim.grad_clip=1.0"])
    step.micro_step(batch(step, 0), step=0)
    p0, bn0 = params(step), norm_buffers(step.engine.module)
    bad = batch(step, 1)
    bad["regions"][0, 0, 0] = float("nan")
    stats = step.micro_step(bad, step=1)
    out = {"nan_input_norm_buffers": len(bn0),
           "nan_input_loss_finite": bool(torch.isfinite(stats["loss"])),
           "nan_input_params_unchanged": all(torch.equal(p0[n], v) for n, v in params(step).items()),
           "nan_input_buffers_unchanged": all(torch.equal(bn0[n], v)
                                              for n, v in norm_buffers(step.engine.module).items()),
           "nan_input_keys_finite": all(bool(torch.isfinite(t).all()) for t in
                                        norm_buffers(step.momentum.module).values())}
    stats = step.micro_step(batch(step, 2), step=2)
    out["nan_input_next_loss_finite"] = bool(torch.isfinite(stats["loss"]))
    out["nan_input_counts"] = step.skips.counts.tolist()
    model = step.engine.module
    model.eval()
    with torch.no_grad():
        img, txt = model(trainer.inputs_to(batch(step, 3), step.device, torch.float32))
    model.train()
    out["nan_input_eval_finite"] = bool(torch.isfinite(img).all() and torch.isfinite(txt).all())
    return out


def main():
    du.init_distributed(timeout_s=120)
    checks = {"clip": clip_check, "compile": compile_check, "nonfinite": nonfinite_check}
    print(json.dumps(checks[sys.argv[1]]()))


if __name__ == "__main__":
    main()
