"""Atomic checkpoints with a real 2-rank DeepSpeed engine (gloo, CPU)."""
import json
import os
import random
import subprocess
import time

import pytest
import torch

from conftest import PYTHON, ROOT, child_env, free_port, kill_job
from user_dist import checkpoint as ckpt

SCRIPT = os.path.join(ROOT, "tests", "scripts", "ckpt_engine.py")
pytestmark = pytest.mark.slow


def launch(run_dir, n, *extra, env=None):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           SCRIPT, str(run_dir), str(n), *extra]
    return subprocess.Popen(cmd, env=child_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_saves_are_complete_pruned_and_resumable(tmp_path):
    finish(launch(tmp_path, 4))
    root = tmp_path / "checkpoints"
    done = ckpt.list_checkpoints(str(root))
    assert [os.path.basename(d) for d in done] == ["step_00000003", "step_00000004"]  # keep_last=2
    assert (root / "latest").read_text() == "step_00000004"
    last = root / "step_00000004"
    assert json.loads((last / "COMPLETE").read_text())["step"] == 4
    assert sorted(os.listdir(last / "user_state")) == ["rank_00000.pt", "rank_00001.pt"]
    for r in (0, 1):
        state = torch.load(last / "user_state" / f"rank_{r:05d}.pt", weights_only=True)
        assert state["queue"] == {"owner": r, "step": 4} and "rng" in state
    weights = ckpt.load_model_weights(str(last))
    assert weights["0.weight"].dtype == torch.float32 and weights["0.weight"].shape == (16, 8)
    assert "1.running_mean" in weights  # buffers travel too
    out = finish(launch(tmp_path, 1, "--resume"))
    assert "resumed 4" in out and "saved 5" in out
    assert (root / "latest").read_text() == "step_00000005"


def test_bf16_zero2_checkpoint_holds_fp32_weights(tmp_path):
    finish(launch(tmp_path, 2, env={"PRECISION": "bf16", "ZERO": "2"}))
    w = ckpt.load_model_weights(str(tmp_path / "checkpoints" / "step_00000002"))["0.weight"]
    assert w.dtype == torch.float32
    # Weights after AdamW steps are not all representable in bf16: full precision was kept.
    assert not torch.equal(w, w.bfloat16().float())


def test_kill_during_saves_leaves_a_complete_latest(tmp_path):
    rng = random.Random(0)
    for attempt in range(2):
        proc = launch(tmp_path, 1000, *(["--resume"] if attempt else []))
        seen = 0
        deadline = time.time() + 240
        while seen < 2 and time.time() < deadline:
            line = proc.stdout.readline()
            seen += line.startswith("saved")
        assert seen == 2, "the job did not start saving"
        time.sleep(rng.uniform(0.0, 0.6))  # land somewhere inside a later save
        kill_job(proc, str(tmp_path))
        proc.stdout.close()
        latest = ckpt.latest_checkpoint(str(tmp_path / "checkpoints"))
        assert latest is not None and ckpt.is_complete(latest)
        ckpt.load_model_weights(latest)
        for r in (0, 1):
            torch.load(os.path.join(latest, "user_state", f"rank_{r:05d}.pt"), weights_only=True)
        assert json.loads(open(os.path.join(latest, "meta.json")).read())["world_size"] == 2
    # A resumed job continues from the newest complete one and cleans up leftovers.
    step = ckpt.CheckpointMeta.read(ckpt.latest_checkpoint(str(tmp_path / "checkpoints"))).step
    out = finish(launch(tmp_path, 1, "--resume"))
    assert f"resumed {step}" in out
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.endswith(".tmp")]


def test_incomplete_folder_is_never_chosen(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000001").mkdir(parents=True)
    (root / "step_00000001" / "COMPLETE").write_text("{}")
    (root / "step_00000002").mkdir()  # no COMPLETE: a save that died before finishing
    (root / "step_00000003.tmp").mkdir()
    (root / "step_00000003.tmp" / "COMPLETE").write_text("{}")
    (root / "latest").write_text("step_00000002")
    assert ckpt.latest_checkpoint(str(root)) == str(root / "step_00000001")


def test_the_next_save_is_estimated_without_a_converted_universal_folder(tmp_path):
    """A resume on other ranks leaves step_X/universal beside the checkpoint;
    the next save will not write one, so it does not count."""
    step = tmp_path / "checkpoints" / "step_00000004"
    (step / "universal" / "zero").mkdir(parents=True)
    (step / "COMPLETE").write_text("{}")
    (step / "model_fp32.pt").write_bytes(b"m" * 3000)
    (step / "universal" / "zero" / "exp_avg.pt").write_bytes(b"u" * 5000)
    assert ckpt.estimate_bytes(str(tmp_path / "checkpoints"), None) == 3002


class _RunsCode:
    """What an attacker's checkpoint holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_files_would_run_code_is_refused_before_deepspeed_loads_it(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    step = tmp_path / "step_00000004"
    (step / "universal" / "zero").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}, "zero_stage": ZeroStageEnum.gradients,
                "loss_scaler": DynamicLossScaler(2.0 ** 16, 1000, 1.0, 2, True)}, step / "mp_rank_00_model_states.pt")
    assert ckpt.unsafe_files(str(step)) == []  # DeepSpeed's own classes are allowed
    marker = tmp_path / "code_ran"
    torch.save({"exp_avg": torch.zeros(2), "payload": _RunsCode(marker)}, step / "universal" / "zero" / "x.pt")
    with pytest.raises(ckpt.ResumeError) as e:
        ckpt.check_loads_without_code(str(step))
    message = str(e.value)
    assert str(step / "universal" / "zero" / "x.pt") in message and "system" in message
    assert "train.trust_checkpoint=true" in message
    assert not marker.exists()


def test_checkpoint_meta_reads_the_layout_or_falls_back_to_the_saved_config(tmp_path):
    import json

    from user_dist.config import load_config, to_yaml

    cfg = load_config(None, ["train.batch_size=12", "train.grad_accum=3", "train.zero_stage=1",
                             "queue.size_per_rank=96", "queue.mode=sharded"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))

    def meta(**fields):
        (tmp_path / "meta.json").write_text(json.dumps(dict(step=5, epoch=0, step_in_epoch=5, **fields)))
        return ckpt.CheckpointMeta.read(str(tmp_path))

    # A checkpoint older than meta's layout fields: from its config.yaml.
    old = meta(world_size=4)
    assert (old.world_size, old.global_batch, old.zero_stage) == (4, 4 * 12 * 3, 1)
    assert (old.queue_size_per_rank, old.queue_mode) == (96, "sharded")
    # A ZeRO-1 run whose YAML said 0 (a DeepSpeed JSON override): its optimiser partitions tell.
    zero0 = load_config(None, ["train.batch_size=12"])
    (tmp_path / "config.yaml").write_text(to_yaml(zero0))
    assert meta(world_size=2).zero_stage == 0
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert meta(world_size=2).zero_stage == 1
    # meta.json wins (the stage in force, after any DeepSpeed JSON override); unknown keys are ignored.
    new = meta(world_size=2, global_batch=64, zero_stage=0, queue_size_per_rank=8, queue_mode="replicated",
               written_by_a_later_version=True)
    assert (new.global_batch, new.zero_stage, new.queue_size_per_rank) == (64, 0, 8)


def test_checkpoint_meta_round_trips_through_meta_json(tmp_path):
    meta = ckpt.CheckpointMeta(step=7, epoch=1, step_in_epoch=2, world_size=2, global_batch=48, zero_stage=2,
                               queue_size_per_rank=64, queue_mode="sharded", skipped_nonfinite=1, samples=336,
                               best_rsum=12.5, best_tag="step_00000005", data_fingerprint={"seed": 0}, time=1.0)
    meta.write(str(tmp_path))
    assert ckpt.CheckpointMeta.read(str(tmp_path)) == meta


def _file_bytes(folder):
    return {os.path.relpath(os.path.join(b, n), folder): open(os.path.join(b, n), "rb").read()
            for b, _, names in os.walk(folder) for n in names}


def test_a_write_that_fills_the_disk_leaves_the_saved_checkpoints_intact(tmp_path, small_disk):
    """A real full disk (tmpfs) in the middle of a save, the free-space check
    turned off: the job stops with a message naming the failed save and the
    newest complete checkpoint, which is untouched; freed, it resumes."""
    disk = small_disk(8)
    run_dir = os.path.join(disk.path, "run")
    finish(launch(run_dir, 2))
    root = os.path.join(run_dir, "checkpoints")
    before = _file_bytes(os.path.join(root, "step_00000002"))
    ballast = disk.fill(leave_bytes=0)
    proc = launch(run_dir, 1, "--resume", "--no-space-check")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]
    assert "saving checkpoint step_00000003 failed on rank" in out and "No space left on device" in out, out[-3000:]
    assert f"the newest complete one is {os.path.join(root, 'step_00000002')}" in out
    assert ckpt.latest_checkpoint(root) == os.path.join(root, "step_00000002")
    assert _file_bytes(os.path.join(root, "step_00000002")) == before  # bit for bit
    assert not [n for n in os.listdir(root) if ".tmp." in n]  # no half-written pointer file
    os.remove(ballast)
    out = finish(launch(run_dir, 1, "--resume"))
    assert "resumed 2" in out and "saved 3" in out


def test_a_save_that_cannot_fit_is_refused_before_writing_on_every_rank(tmp_path, small_disk):
    disk = small_disk(8)
    run_dir = os.path.join(disk.path, "run")
    finish(launch(run_dir, 2))
    root = os.path.join(run_dir, "checkpoints")
    before = _file_bytes(root)
    # The next save is estimated at the newest one's size.
    assert ckpt.estimate_bytes(root, None) == ckpt.folder_bytes(os.path.join(root, "step_00000002")) > 0
    ballast = disk.fill(leave_bytes=ckpt.folder_bytes(os.path.join(root, "step_00000002")) // 2)
    proc = launch(run_dir, 1, "--resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    # Both ranks refuse alike (no rank waits for another in a collective).
    assert out.count("not enough free space for checkpoint step_00000003") == 2, out[-3000:]
    assert "Nothing was written; the newest complete checkpoint is" in out
    assert _file_bytes(root) == before
    os.remove(ballast)
    assert "saved 3" in finish(launch(run_dir, 1, "--resume"))
