"""TrainStep's own gradient clipping (ZeRO 0) against DeepSpeed's, which
configs hand clipping to the step (user_dist.deepspeed_config.take_clipping),
and non-finite steps skipped on the device (user_dist.nonfinite)."""
import json
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT, child_env
from user_dist.config import load_config
from user_dist.deepspeed_config import derive, take_clipping


def step_check(name: str) -> dict:
    """Run tests/scripts/step_checks.py NAME (its own process group) and return its JSON."""
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "tests", "scripts", "step_checks.py"), name],
                          env=child_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("overrides, moved", [
    (["train.zero_stage=0", "train.precision=fp32"], True),
    (["train.zero_stage=0", "train.precision=bf16"], True),
    (["train.zero_stage=0", "train.precision=fp16"], False),  # DeepSpeed unscales before it clips
    (["train.zero_stage=1", "train.precision=bf16"], False),  # partitioned gradients: ZeRO clips
    (["train.zero_stage=0", "optim.grad_clip=0"], False),
])
def test_clipping_moves_out_of_deepspeed_only_without_zero_and_fp16(overrides, moved):
    cfg = load_config(None, overrides)
    ds = derive(cfg, world_size=2)
    clip = take_clipping(ds)
    if moved:
        assert clip == cfg.optim.grad_clip and ds["gradient_clipping"] == 0.0
    else:
        assert clip == 0.0 and ds["gradient_clipping"] == cfg.optim.grad_clip


def test_a_user_override_to_zero_2_keeps_clipping_in_deepspeed():
    ds = derive(load_config(None, ["train.zero_stage=0"]), world_size=1)
    ds["zero_optimization"] = {"stage": 2}  # what with_user_override does with such a JSON
    assert take_clipping(ds) == 0.0 and ds["gradient_clipping"] == 2.0


@pytest.mark.slow
def test_own_clipping_updates_the_weights_like_deepspeeds_clipping():
    r = step_check("clip")
    assert r["own_clip"] == 0.05 and r["own_ds_gradient_clipping"] == 0.0
    assert r["deepspeed_clip"] == 0.0 and r["ds_ds_gradient_clipping"] == 0.05
    assert r["grad_norm"] > 0.05  # the clip is active in this step
    assert r["backward_allreduce"] is False  # one rank: no gradient bucket round trip
    # Same update as DeepSpeed's clipping (float32 summation order aside), and
    # clipping changes it measurably.
    assert r["max_param_diff_own_vs_deepspeed"] < 1e-6
    assert r["max_param_diff_clipped_vs_unclipped"] > 1e-3
    assert r["max_param_move"] > 1e-3


@pytest.mark.slow
@pytest.mark.long
def test_compiled_towers_train_like_eager_ones():
    """train.compile=default (inductor on the CPU here; towers and loss): the
    same losses and gradient norms over three steps, the same checkpoint
    keys, and GPO compiled around its eager GRU."""
    r = step_check("compile")
    # The later losses are computed with the weights after optimiser steps.
    assert r["default_losses"] == pytest.approx(r["none_losses"], rel=1e-5, abs=1e-6)
    assert r["default_grad_norms"] == pytest.approx(r["none_grad_norms"], rel=1e-4)
    # The queue term, with the queue empty, half full and full (compiled: every slot read, empty ones masked).
    assert r["default_loss_queue"] == pytest.approx(r["none_loss_queue"], rel=1e-5, abs=1e-6)
    assert r["same_state_keys"]
    assert set(r["compiled_modules"]) == {"SGE", "Projection", "BertModel", "GPO"}


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_on_the_device_without_a_host_read():
    r = step_check("nonfinite")
    assert r["device_skips"] and r["optimizer_is_ours"] == "AdamW"
    assert r["skipped_loss_finite"] is False  # the fault hook did make the loss NaN
    # Nothing the optimiser or the queue holds moved: the fused AdamW saw found_inf.
    assert r["params_unchanged"] and r["adam_unchanged"]
    assert r["adam_keys"] == ["exp_avg", "exp_avg_sq", "step"]
    assert r["queue_unchanged"] and r["queue_ptr_moved_by"] == 8  # the ring advanced, nothing written
    assert r["momentum_finite"]
    assert r["counts_after_skip"] == [1, 1, 1]  # skipped, current run, longest run
    # The next step trains again and ends the run of skips.
    assert r["next_loss_finite"] and r["next_step_moves"] > 1e-3
    assert r["counts_after_next"] == [1, 0, 1]
    assert r["queue_ids_after_next"] == 8  # the skipped step's 8 slots stay empty (id -1)
    # A NaN in the input, not the loss: the BatchNorm running statistics keep
    # their values, so keys and evaluation stay finite and training goes on.
    assert r["nan_input_norm_buffers"] > 0 and r["nan_input_loss_finite"] is False
    assert r["nan_input_params_unchanged"] and r["nan_input_buffers_unchanged"] and r["nan_input_keys_finite"]
    assert r["nan_input_next_loss_finite"] and r["nan_input_counts"] == [1, 0, 1]
    assert r["nan_input_eval_finite"]
    # ZeRO 1: DeepSpeed wraps the optimiser; the host checks and the step returns None.
    assert r["zero1_device_skips"] is False and r["zero1_returns"] == "None"
