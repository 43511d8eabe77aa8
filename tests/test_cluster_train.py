"""launch/train.py on a real cluster: Slurm (two nodes), pdsh across two
network-namespaced hosts, a killed rank and a restart, TensorBoard read back.

The tiny synthetic set and model of tests/test_train_job.py keep each job to
about a minute, most of it DeepSpeed's start-up.
"""
import os
import subprocess
import time

import pytest

from conftest import ROOT, free_port
from test_train_job import final_state, losses, tiny_overrides
from tests.cluster.daemons import in_netns, wait_until
from tests.cluster.fixtures import VENV_BIN
from user_dist import checkpoint as ckpt

pytestmark = pytest.mark.cluster
TRAIN_SBATCH = os.path.join(ROOT, "launch", "slurm", "train.sbatch")
CPU_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
JOB_TIMEOUT_S = 300


def write_config(path, overrides):
    """A YAML config holding the tiny overrides (what a user would submit);
    values keep their YAML spelling ([1], true, 24, paths)."""
    tree = {}
    for item in overrides:
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def dump(node, indent=""):
        lines = []
        for k, v in node.items():
            lines += [f"{indent}{k}:", *dump(v, indent + "  ")] if isinstance(v, dict) else [f"{indent}{k}: {v}"]
        return lines

    path.write_text("\n".join(dump(tree)) + "\n")
    return str(path)


def test_slurm_two_node_job_fails_fast_on_a_killed_rank_and_resumes(slurm_cluster, tiny_shards, tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_overrides(tiny_shards, tmp_path, "slurm", **{
        "train.ckpt_every_steps": 2, "train.max_steps": 20, "train.epochs": 2}))
    # Rank 1 (on the second node) SIGKILLs itself right after step 5: a rank lost
    # at a known point. (An outside kill raced the ~0.2 s steps: polling could
    # miss the short window between the step-4 and step-6 checkpoints.)
    env = dict(slurm_cluster.env, USER_DIST_FAULT_KILL="5@1")
    job = slurm_cluster.sbatch(TRAIN_SBATCH, [cfg], options=CPU_NODES, env=env, cwd=ROOT)
    ckpt_root = str(tmp_path / "slurm" / "checkpoints")
    slurm_cluster.wait_for(job, lambda: ckpt.latest_checkpoint(ckpt_root), JOB_TIMEOUT_S, "the first checkpoint")
    first_ckpt_at = time.monotonic()  # step 2: the kill follows within a few steps
    # srun --kill-on-bad-exit ends the job at once, not after a collective timeout.
    result = slurm_cluster.wait(job, JOB_TIMEOUT_S)
    log = slurm_cluster.output(job)
    assert result.state == "FAILED" and result.exit_code != 0, log
    assert time.monotonic() - first_ckpt_at < 60, log
    assert "rank 1 kills itself after step 5" in log and "task 1: Killed" in log, log
    last = ckpt.latest_checkpoint(ckpt_root)
    saved = ckpt.CheckpointMeta.read(last).step
    assert saved == 4 and ckpt.is_complete(last)

    # Resubmitting the same command resumes from the newest complete checkpoint.
    job2 = slurm_cluster.sbatch(TRAIN_SBATCH, [cfg], options=CPU_NODES, env=slurm_cluster.env, cwd=ROOT)
    result = slurm_cluster.wait(job2, JOB_TIMEOUT_S)
    log = slurm_cluster.output(job2)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), log[-4000:]
    assert f"at step {saved} " in log and "world size 2 (slurm launcher)" in log
    meta, *_ = final_state(tmp_path / "slurm")
    assert meta.step == 20 and meta.world_size == 2
    assert sorted(losses(tmp_path / "slurm")) == list(range(1, 21))  # no step lost


def test_deepspeed_pdsh_launcher_trains_across_two_hosts(pdsh_hosts, tiny_shards, tmp_path, tensorboard_server):
    overrides = tiny_overrides(tiny_shards, tmp_path, "pdsh", **{"train.max_steps": 10})
    argv = pdsh_hosts.deepspeed_argv(os.path.join(VENV_BIN, "deepspeed"), free_port(), "launch/train.py",
                                     overrides)
    proc = subprocess.run(in_netns(pdsh_hosts.launch_netns, argv), env=pdsh_hosts.launcher_env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "world size 2 (deepspeed launcher)" in proc.stdout
    meta, *_ = final_state(tmp_path / "pdsh")
    assert meta.step == 10 and meta.world_size == 2
    # The run's TensorBoard logs, read back from a real server over HTTP.
    tb = tensorboard_server(str(tmp_path / "pdsh" / "tb"))
    tags = wait_until(lambda: (t := tb.tags()) and any("val/rsum" in x for x in t.values()) and t, 60,
                      "TensorBoard to load the run")
    scalar_tags = {t for run in tags.values() for t in run}
    for tag in ("train/loss", "train/loss_batch", "train/loss_queue", "train/pos_sim", "train/hardest_neg",
                "train/grad_norm", "lr/group0", "perf/samples_per_s", "queue/pool_size", "val/rsum"):
        assert tag in scalar_tags, (tag, sorted(scalar_tags))
    run_name = next(r for r, t in tags.items() if "train/loss" in t)
    points = wait_until(lambda: len(p := tb.scalars(run_name, "train/loss")) == 10 and p, 60, "all 10 points")
    assert [p[1] for p in points] == list(range(1, 11))
    assert [p[2] for p in points] == pytest.approx([losses(tmp_path / "pdsh")[s] for s in range(1, 11)])
