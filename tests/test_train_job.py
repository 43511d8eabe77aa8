"""The training job for real: 2 CPU ranks, DeepSpeed engine, tiny_shards on disk.

A tiny synthetic set (96 train images, 10 steps per epoch at 2 x 24) and a
tiny model keep each run to seconds after DeepSpeed's start-up.
"""
import glob
import json
import os
import signal
import subprocess
import time

import pytest
from pathlib import Path
import torch

from conftest import PYTHON, ROOT, child_env, free_port, kill_job
from user_dist import checkpoint as ckpt

pytestmark = pytest.mark.slow
TRAIN = os.path.join(ROOT, "launch", "train.py")
DEEPSPEED = os.path.join(os.path.dirname(PYTHON), "deepspeed")


def tiny_overrides(tiny_shards, run_root, name, **extra):
    ov = {
        "data.train_shards": tiny_shards / "train", "data.val_shards": tiny_shards / "val",
        "data.test_shards": tiny_shards / "test", "data.num_workers": 1, "data.shuffle_buffer": 50,
        "model.embed_size": 32, "model.region_dim": 32, "model.mlp_hidden": 32,
        "model.gpo_pe_dim": 8, "model.gpo_hidden": 8,
        "model.text.hidden_size": 32, "model.text.num_layers": 1, "model.text.num_heads": 2,
        "model.text.intermediate_size": 64, "model.text.max_position": 64, "model.text.lr_mult": 1.0,
        "queue.size_per_rank": 64, "train.batch_size": 24, "train.epochs": 2, "train.precision": "fp32",
        "train.log_every": 1, "train.run_root": run_root, "train.run_name": name, "train.dist_timeout_s": 60,
        "optim.decay_epochs": "[1]", "eval.protocols": "[generic]", "eval.batch_size": 20,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def start(launcher, overrides, env=None, nproc=2, port=None, **popen):
    port = str(port or free_port())
    if launcher == "deepspeed":
        cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", port, TRAIN, *overrides]
    else:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
               TRAIN, *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


def run(launcher, overrides, timeout=400, env=None, nproc=2, port=None):
    proc = start(launcher, overrides, env=env, nproc=nproc, port=port)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def losses(run_dir):
    """step -> logged train/loss (the last line wins: a resumed run rewrites steps)."""
    out = {}
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "train/loss" in rec:
                out[rec["step"]] = rec["train/loss"]
    return out


def final_state(run_dir):
    last = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    model = torch.load(os.path.join(last, "model_fp32.pt"), weights_only=True)
    momentum = torch.load(os.path.join(last, "momentum.pt"), weights_only=True)
    queues = [torch.load(os.path.join(last, "user_state", f"rank_{r:05d}.pt"), weights_only=True)["queue"]
              for r in (0, 1)]
    return ckpt.CheckpointMeta.read(last), model, momentum, queues


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"
        else:
            assert a[k] == b[k], f"{what}: {k} differs"


def killed_after_checkpoint(overrides, run_root, step: int):
    """Run a 2-rank torchrun job whose ranks SIGKILL themselves right after the step-``step``
    checkpoint (a test hook: an outside kill on seeing that checkpoint raced the next ~0.2 s
    steps); returns its run folder, whose newest checkpoint is that one."""
    proc = start("torchrun", overrides, env={"USER_DIST_FAULT_KILL": str(step)})
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_job(proc, f"train.run_root={run_root} ")
    assert proc.returncode != 0 and f"kills itself after step {step}" in out, out[-3000:]
    run_dir = run_root / next(o.split("=", 1)[1] for o in overrides if o.startswith("train.run_name="))
    assert os.path.basename(ckpt.latest_checkpoint(str(run_dir / "checkpoints"))) == f"step_{step:08d}"
    return run_dir


def assert_resumed_run_matches(full_dir, cut_dir, steps: int, epoch: int) -> dict:
    """A killed-and-resumed 2-rank run (cut_dir) against the uninterrupted one: the same logged loss
    at every step, online and momentum towers and both ranks' queue shards bit for bit at the end.
    Returns the uninterrupted run's losses (step -> loss)."""
    full, cut = losses(full_dir), losses(cut_dir)
    assert sorted(full) == sorted(cut) == list(range(1, steps + 1))
    assert [full[s] for s in range(1, steps + 1)] == [cut[s] for s in range(1, steps + 1)]
    meta_a, model_a, mom_a, q_a = final_state(full_dir)
    meta_b, model_b, mom_b, q_b = final_state(cut_dir)
    assert meta_a.step == meta_b.step == steps and meta_a.epoch == meta_b.epoch == epoch
    assert_same_tensors(model_a, model_b, "online towers")
    assert_same_tensors(mom_a, mom_b, "momentum towers")
    for r in (0, 1):
        assert_same_tensors(q_a[r], q_b[r], f"queue shard of rank {r}")
    return full


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tiny_shards, tmp_path):
    """2 ranks, 12 steps across an epoch boundary (10 steps/epoch) with a
    validation, vs the same run killed (SIGKILL) after its step-6 checkpoint
    and resumed: identical per-step losses, weights, momentum towers, queues."""
    common = {"train.deterministic": "true", "train.ckpt_every_steps": 6, "train.max_steps": 12}
    port = free_port()
    code, out = run("deepspeed", tiny_overrides(tiny_shards, tmp_path, "full", **common), port=port)
    assert code == 0, out[-3000:]
    # DeepSpeed's CPU all-reduce segments in /dev/shm (~70 MB per rank, used
    # under its own launcher) were left behind by every job: no more.
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []

    cut_dir = killed_after_checkpoint(tiny_overrides(tiny_shards, tmp_path, "cut", **common), tmp_path, 6)

    code, out = run("deepspeed", tiny_overrides(tiny_shards, tmp_path, "cut", **common, **{"train.resume": "auto"}))
    assert code == 0, out[-3000:]
    assert "resumed from" in out and "at step 6 " in out, "\n".join(l for l in out.splitlines() if "INFO" in l)

    full = assert_resumed_run_matches(tmp_path / "full", cut_dir, steps=12, epoch=1)
    # The run did learn something and validated at the epoch boundary.
    assert full[12] < full[1]
    with open(tmp_path / "full" / "train_log.jsonl") as f:
        assert any("val/rsum" in json.loads(line) for line in f)


def logged(run_dir, key):
    """step -> the last logged value of ``key`` (train_log.jsonl)."""
    out = {}
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if key in rec:
                out[rec["step"]] = rec[key]
    return out


def test_a_run_continues_on_another_number_of_ranks_with_the_same_global_batch(tiny_shards, tmp_path):
    """2 ranks x 24 to step 6, then 1 rank x 48 to step 12 (across the epoch
    boundary at 10), then 2 ranks x 24 to 14, sharded queue: the step count,
    LR schedule and run carry over, the negative pool is laid out on the new
    ranks; another global batch, or ZeRO 1, is refused with what to change."""
    common = {"queue.mode": "sharded", "train.ckpt_every_steps": 3}
    name = "elastic"

    def job(nproc, batch, steps, **extra):
        return run("torchrun", tiny_overrides(tiny_shards, tmp_path, name, **common, **{
            "train.batch_size": batch, "train.max_steps": steps, "train.resume": "auto", **extra}), nproc=nproc)

    code, out = run("torchrun", tiny_overrides(tiny_shards, tmp_path, name, **common, **{"train.max_steps": 6}))
    assert code == 0, out[-3000:]
    code, out = job(1, 48, 12)
    assert code == 0, out[-3000:]
    # 6 steps x 48 keys filled the 2 x 64 slots; one rank holds 64 of them, the newest.
    assert "written by 2 ranks, on 1: the global batch (48)" in out, out[-3000:]
    assert "the negative pool is 64 slots (was 128), 64 entries kept" in out
    assert "resumed from" in out and "at step 6 " in out
    code, out = job(2, 24, 14)
    assert code == 0, out[-3000:]
    assert "written by 1 ranks, on 2" in out and "the negative pool is 128 slots (was 64), 64 entries kept" in out
    meta, *_ = final_state(tmp_path / name)
    assert (meta.step, meta.world_size, meta.global_batch, meta.zero_stage) == (14, 2, 48, 0)
    assert meta.samples == 14 * 48
    run_dir = tmp_path / name
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, 15)) and all(v == v for v in loss.values())  # none lost, none NaN
    # The LR schedule went on where it was: decayed x0.1 from the epoch boundary (step 10) on.
    lr = logged(run_dir, "lr/group0")
    assert [lr[s] for s in range(1, 15)] == pytest.approx([5e-4] * 9 + [5e-5] * 5)
    assert logged(run_dir, "train/epoch")[14] == 1.0
    pool = logged(run_dir, "queue/pool_size")  # world x size_per_rank of the job that ran each step
    assert [pool[s] for s in range(1, 15)] == [128] * 6 + [64] * 6 + [128] * 2
    # The optimiser came back both times: Adam's step count is the run's (a fresh one would say 2).
    # DeepSpeed's own file, written by this test: it holds more than tensors.
    engine_state = torch.load(os.path.join(ckpt.latest_checkpoint(str(run_dir / "checkpoints")),
                                           "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    assert engine_state["global_steps"] == 14
    assert {int(v["step"]) for v in engine_state["optimizer"]["state"].values()} == {14}

    # The same ranks with another queue size: the pool is laid out afresh (the newest 64 of 128).
    code, out = job(2, 24, 15, **{"queue.size_per_rank": 32})
    assert code == 0, out[-3000:]
    assert "with queue.size_per_rank 32 (was 64), queue.mode sharded (was sharded)" in out
    assert logged(run_dir, "queue/pool_size")[15] == 64 and final_state(run_dir)[0].step == 15

    # Refused, with what to change: another global batch; ZeRO 1-2 (partitioned
    # optimiser state). One process without a launcher: its exit code is the job's.
    def single(batch, **extra):
        r = subprocess.run([PYTHON, TRAIN, *tiny_overrides(tiny_shards, tmp_path, name, **common, **{
            "train.batch_size": batch, "train.max_steps": 16, "train.resume": "auto", **extra})],
            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
        return r.returncode, r.stdout + r.stderr

    config_before = (run_dir / "config.yaml").read_bytes()
    code, out = single(24)
    assert code == 2, out[-3000:]
    assert "global batch of 48; this job has 1 ranks x train.batch_size 24 x train.grad_accum 1 = 24" in out
    assert "(here: train.batch_size=48)" in out
    code, out = single(48, **{"train.zero_stage": 1})
    assert code == 2, out[-3000:]
    assert "a ZeRO-0 run continues with ZeRO 0 and a ZeRO 1-2 run with ZeRO 1-2" in out
    assert final_state(run_dir)[0].step == 15  # the refusals wrote nothing
    assert (run_dir / "config.yaml").read_bytes() == config_before


def test_a_full_disk_stops_the_job_cleanly_and_it_resumes_once_freed(tiny_shards, tmp_path, small_disk):
    """The run folder on a real 52 MB file system, checkpoints of ~20 MB every
    2 steps: the third does not fit. Every rank stops before writing it, with
    a message; the step-4 checkpoint and the log are intact; with more space
    the same command resumes there."""
    disk = small_disk(52)
    common = {"train.run_root": disk.path, "train.ckpt_every_steps": 2, "train.keep_last": 2}
    code, out = run("torchrun", tiny_overrides(tiny_shards, tmp_path, "full", **common, **{"train.max_steps": 8}))
    assert code != 0, out[-3000:]
    assert out.count("not enough free space for checkpoint step_00000006") == 2, out[-4000:]  # both ranks
    run_dir = os.path.join(disk.path, "full")
    root = os.path.join(run_dir, "checkpoints")
    assert "Nothing was written; the newest complete checkpoint is " + os.path.join(root, "step_00000004") in out
    assert [os.path.basename(d) for d in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000004"]
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]
    assert sorted(losses(run_dir)) == list(range(1, 7))  # the log is whole up to the stop
    disk.resize(120)
    code, out = run("torchrun", tiny_overrides(tiny_shards, tmp_path, "full", **common, **{
        "train.max_steps": 8, "train.resume": "auto"}))
    assert code == 0, out[-3000:]
    assert "at step 4 " in out
    assert ckpt.CheckpointMeta.read(ckpt.latest_checkpoint(root)).step == 8
    assert sorted(losses(run_dir)) == list(range(1, 9))


def test_a_zero2_run_continues_on_another_number_of_ranks_through_the_universal_format(tiny_shards, tmp_path,
                                                                                      small_disk):
    """ZeRO 2, bf16: 2 ranks x 24 to step 4, then 1 rank x 48 to step 6, then
    2 ranks to step 8. The partitioned optimiser state goes through DeepSpeed's universal format;
    the BatchNorm statistics, which that format does not carry, come back too.
    On a real 200 MB file system, to see a conversion that would not fit refused."""
    disk = small_disk(200)
    runs = disk.path
    common = {"train.zero_stage": 2, "train.precision": "bf16", "train.ckpt_every_steps": 2}
    code, out = run("torchrun", tiny_overrides(tiny_shards, runs, "z2", **common, **{"train.max_steps": 4}))
    assert code == 0, out[-3000:]
    root = Path(runs) / "z2" / "checkpoints"
    counts4 = {k: int(v) for k, v in ckpt.load_model_weights(str(root / "step_00000004")).items()
               if k.endswith("num_batches_tracked")}
    assert counts4 and all(v > 0 for v in counts4.values())

    def listing(folder):
        return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())

    code, out = run("torchrun", tiny_overrides(tiny_shards, runs, "z2", **common, **{
        "train.max_steps": 6, "train.batch_size": 48, "train.resume": "auto"}), nproc=1)
    assert code == 0, out[-3000:]
    assert "to DeepSpeed's universal format" in out and "written by 2 ranks, on 1" in out
    assert os.path.isdir(root / "step_00000004" / "universal")  # converted once, kept with its checkpoint
    last = ckpt.latest_checkpoint(str(root))
    assert ckpt.CheckpointMeta.read(last).step == 6 and ckpt.CheckpointMeta.read(last).world_size == 1
    # Adam's step count went on from 4 (a fresh optimiser would say 2).
    optim = torch.load(os.path.join(last, "zero_pp_rank_0_mp_rank_00_optim_states.pt"), map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
    assert {int(v["step"]) for v in optim.values()} == {6}
    # Every BatchNorm counted 6 steps' batches: its statistics were restored (else 2 steps' worth).
    counts6 = {k: int(v) for k, v in ckpt.load_model_weights(last).items() if k.endswith("num_batches_tracked")}
    assert counts6 == {k: v * 6 // 4 for k, v in counts4.items()}
    assert sorted(losses(os.path.join(runs, "z2"))) == list(range(1, 7))
    # Back to 2 ranks but with ZeRO 0: refused with what to set, nothing written.
    code, out = run("torchrun", tiny_overrides(tiny_shards, runs, "z2", **{
        **common, "train.zero_stage": 0, "train.max_steps": 8, "train.resume": "auto"}))
    assert code != 0 and "a ZeRO-0 run continues with ZeRO 0 and a ZeRO 1-2 run with ZeRO 1-2" in out, out[-3000:]
    assert ckpt.latest_checkpoint(str(root)) == last
    # Back to 2 ranks with ZeRO 2, first with too little free space for the
    # conversion: every rank stops with a message, and only the leftover of a
    # killed conversion is removed.
    stale = root / "step_00000006" / "universal.tmp.99999"
    stale.mkdir()
    (stale / "partial").write_bytes(b"x" * 1000)
    saved = listing(root)
    ballast = disk.fill(leave_bytes=4 * 2**20)
    code, out = run("torchrun", tiny_overrides(tiny_shards, runs, "z2", **common, **{
        "train.max_steps": 8, "train.resume": "auto"}))
    assert code != 0, out[-3000:]
    assert "[rank0] ERROR not enough free space to convert" in out, out[-3000:]
    assert "resume on the number of ranks that wrote it (1)" in out, out[-3000:]
    assert "[rank1] ERROR rank 0 could not convert" in out, out[-3000:]
    assert "user_dist/checkpoint.py" not in out, out[-3000:]  # messages, not tracebacks of ours
    assert listing(root) == [e for e in saved if "universal.tmp" not in e[0]]
    os.remove(ballast)
    # Freed: the one-rank state is split into two partitions.
    code, out = run("torchrun", tiny_overrides(tiny_shards, runs, "z2", **common, **{
        "train.max_steps": 8, "train.resume": "auto"}))
    assert code == 0, out[-3000:]
    assert "written by 1 ranks, on 2" in out
    last = ckpt.latest_checkpoint(str(root))
    assert ckpt.CheckpointMeta.read(last).step == 8 and ckpt.CheckpointMeta.read(last).world_size == 2
    sizes = []
    for r in range(2):
        optim = torch.load(os.path.join(last, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), map_location="cpu",
                           weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
        assert {int(v["step"]) for v in optim.values()} == {8}
        sizes.append(sum(v["exp_avg"].numel() for v in optim.values()))
    n_params = sum(v.numel() for k, v in ckpt.load_model_weights(last).items() if v.is_floating_point()
                   and not k.endswith(("running_mean", "running_var")))
    assert sizes[0] == sizes[1] and n_params <= sum(sizes) < n_params + 64  # halves, up to alignment padding
    assert sorted(losses(os.path.join(runs, "z2"))) == list(range(1, 9))


def test_preemption_signal_checkpoints_and_exits_zero(tiny_shards, tmp_path):
    proc = start("deepspeed", tiny_overrides(tiny_shards, tmp_path, "pre", **{"train.epochs": 50}))
    deadline = time.time() + 300
    for line in proc.stdout:
        if "INFO step 3/" in line:
            break
        assert time.time() < deadline, "training did not start"
    # SLURM sends the signal to every task of the step (srun --signal / scancel -s USR1).
    # The ranks and their loader workers (not the launchers) carry the
    # --local_rank the deepspeed launcher appends; SLURM signals all of them.
    ranks = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "train.py --local_rank"], capture_output=True,
                           text=True).stdout.split()
    ranks = [int(p) for p in ranks]
    assert len(ranks) >= 2
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested" in out
    latest = ckpt.latest_checkpoint(str(tmp_path / "pre" / "checkpoints"))
    step = ckpt.CheckpointMeta.read(latest).step
    assert 3 <= step < 50 * 10
    # A requeued job picks it up.
    code, out = run("deepspeed", tiny_overrides(tiny_shards, tmp_path, "pre", **{"train.epochs": 50,
                                                                           "train.max_steps": step + 2,
                                                                           "train.resume": "auto"}))
    assert code == 0, out[-3000:]
    assert f"step {step}" in out and ckpt.CheckpointMeta.read(ckpt.latest_checkpoint(
        str(tmp_path / "pre" / "checkpoints"))).step == step + 2


def test_bf16_zero2_sharded_accumulation_run_and_evaluate(tiny_shards, tmp_path):
    """The other corners of the config space run end to end on 2 ranks, and the
    evaluation job reads the checkpoint."""
    code, out = run("torchrun", tiny_overrides(tiny_shards, tmp_path, "corner", **{
        "train.precision": "bf16", "train.zero_stage": 2, "queue.mode": "sharded", "train.grad_accum": 2,
        "train.batch_size": 12, "train.max_steps": 4, "model.gse.kind": "sge"}))
    assert code == 0, out[-3000:]
    last = ckpt.latest_checkpoint(str(tmp_path / "corner" / "checkpoints"))
    assert os.path.basename(last) == "step_00000004"
    r = subprocess.run([PYTHON, os.path.join(ROOT, "launch", "evaluate.py"), "--checkpoint", last,
                        "eval.protocols=[generic]"], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.load(open(tmp_path / "corner" / "eval" / "step_00000004" / "metrics.json"))
    assert 0 <= metrics["generic"]["rsum"] <= 600


def evaluate_checkpoint(run_dir, shards_dir):
    last = ckpt.latest_checkpoint(str(run_dir / "checkpoints"))
    r = subprocess.run([PYTHON, os.path.join(ROOT, "launch", "evaluate.py"), "--checkpoint", last,
                        "--shards", str(shards_dir), "eval.protocols=[generic]"], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(run_dir / "eval" / os.path.basename(last) / "metrics.json") as f:
        return json.load(f)["generic"]


def test_a_trained_checkpoint_scores_far_above_a_random_init_one(tiny_shards, tmp_path):
    """Through the whole path (train -> checkpoint -> evaluation job), scored on
    the 96 training images the tiny model has seen for 4 epochs."""
    common = {"train.epochs": 4, "optim.lr": 2e-3, "optim.decay_epochs": "[10]", "train.validate_every_epochs": 0}
    code, out = run("torchrun", tiny_overrides(tiny_shards, tmp_path, "untrained",
                                               **dict(common, **{"optim.lr": 1e-12, "train.max_steps": 1})))
    assert code == 0, out[-3000:]
    code, out = run("torchrun", tiny_overrides(tiny_shards, tmp_path, "trained", **common))
    assert code == 0, out[-3000:]
    untrained = evaluate_checkpoint(tmp_path / "untrained", tiny_shards / "train")
    trained = evaluate_checkpoint(tmp_path / "trained", tiny_shards / "train")
    # Chance: i2t R@1 ~ 5/480 ~ 1 %, t2i R@1 ~ 1/96 ~ 1 %.
    assert untrained["rsum"] < 120, untrained
    assert trained["rsum"] > untrained["rsum"] + 100, (trained, untrained)
    assert trained["i2t_r1"] > 3 * max(untrained["i2t_r1"], 2.0)


def test_fresh_start_refuses_an_existing_run(tiny_shards, tmp_path):
    (tmp_path / "taken" / "checkpoints").mkdir(parents=True)
    r = subprocess.run([PYTHON, TRAIN, *tiny_overrides(tiny_shards, tmp_path, "taken")], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "refusing to overwrite" in r.stderr and "train.resume=auto" in r.stderr


@pytest.mark.parametrize("overrides,message", [
    ({"train.batch_size": 240, "train.grad_accum": 3, "queue.size_per_rank": 256},
     "one epoch holds fewer pairs than one global batch"),
    ({"train.precision": "fp16"}, "accelerator reports no fp16 support here"),
])
def test_a_job_the_trainer_refuses_leaves_no_run_folder(tiny_shards, tmp_path, overrides, message):
    """A config error found only once the data is opened (an epoch shorter
    than one global batch) or the engine is about to be built (fp16 on the
    CPU) exits 2 like any other and leaves nothing behind."""
    if overrides.get("train.precision") == "fp16":
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().is_fp16_supported():  # CPUs with AVX512-FP16 / AMX-FP16 train fp16
            pytest.skip("this machine's DeepSpeed accelerator supports fp16")
    runs = tmp_path / "new" / "runs"  # the job would create both folders
    r = subprocess.run([PYTHON, TRAIN, *tiny_overrides(tiny_shards, runs, "refused", **overrides)],
                       cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "new").exists()


def test_a_global_recipe_is_split_over_the_ranks_and_logged_at_start(tiny_shards, tmp_path):
    """train.global_batch_size / queue.global_size on 2 ranks: each rank runs
    half (user_dist.plan), the job logs the plan, the checkpoint says so."""
    overrides = [o for o in tiny_overrides(tiny_shards, tmp_path, "global", **{"train.max_steps": 2})
                 if not o.startswith(("train.batch_size=", "queue.size_per_rank="))]
    code, out = run("torchrun", overrides + ["train.global_batch_size=48", "queue.global_size=128"])
    assert code == 0, out[-3000:]
    assert "run plan" in out and "batch per rank        24 x grad_accum 1" in out and "global pool           128" in out
    meta, _, _, queues = final_state(tmp_path / "global")
    assert (meta.global_batch, meta.queue_size_per_rank, meta.step) == (48, 64, 2)
    assert all(q["size_per_rank"] == 64 for q in queues)


def test_a_non_finite_loss_is_skipped_and_counted(tiny_shards, tmp_path):
    """ZeRO 0: the step is skipped on the device, counted at the next log step."""
    code, out = run("torchrun", tiny_overrides(tiny_shards, tmp_path, "nan1", **{"train.max_steps": 5}),
                    env={"USER_DIST_FAULT_NAN": "2:1"})
    assert code == 0, out[-3000:]
    # Step 2 ran (and was skipped): the log step after it, step 3, reads the count.
    assert "non-finite loss or gradient: 1 optimiser step(s) skipped by step 3 (1 in all)" in out
    meta, model, momentum, _ = final_state(tmp_path / "nan1")
    assert meta.step == 5 and meta.skipped_nonfinite == 1
    assert all(torch.isfinite(t).all() for t in [*model.values(), *momentum.values()] if t.is_floating_point())


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tiny_shards, tmp_path):
    """Rank 1's loss alone is NaN, and no gradient norm is taken (no clipping,
    no log step after step 1): only the all-reduced flag can tell rank 0 to
    skip. Had it stepped, the
    NaN gradients averaged from rank 1 would have made its weights NaN."""
    code, out = run("torchrun", tiny_overrides(tiny_shards, tmp_path, "nan_r1", **{
        "train.max_steps": 4, "optim.grad_clip": 0.0, "train.log_every": 3}), env={"USER_DIST_FAULT_NAN": "1:1@1"})
    assert code == 0, out[-3000:]
    assert "non-finite loss or gradient: 1 optimiser step(s) skipped by step 3 (1 in all)" in out
    meta, model, momentum, queues = final_state(tmp_path / "nan_r1")
    assert meta.step == 4 and meta.skipped_nonfinite == 1
    assert all(torch.isfinite(t).all() for t in [*model.values(), *momentum.values()] if t.is_floating_point())
    assert all(torch.isfinite(q[k]).all() for q in queues for k in ("image", "text"))


@pytest.mark.parametrize("zero, fault, message", [
    # ZeRO 0: three optimiser steps skipped on the device, seen at the log step after the third.
    (0, "2:1,3:1,4:1", "3 non-finite losses in a row by step 5: stopping"),
    # ZeRO 1: the host checks each micro-batch; step 2 never completes.
    (1, "2:100", "3 non-finite losses in a row at step 2: stopping"),
])
def test_non_finite_losses_in_a_row_stop_with_a_clear_message(tiny_shards, tmp_path, zero, fault, message):
    code, out = run("torchrun", tiny_overrides(tiny_shards, tmp_path, "nan3", **{
        "train.max_nonfinite_in_a_row": 3, "train.zero_stage": zero}), env={"USER_DIST_FAULT_NAN": fault})
    assert code != 0
    assert message in out, out[-3000:]
