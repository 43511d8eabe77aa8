"""Rank/world discovery works unchanged under every launcher.

Unit tests feed discover() the environment each launcher really sets; the
real runs start tests/dist_scripts/probe.py with 2 ranks under deepspeed,
torchrun and Slurm's srun (a two-node cluster on this machine), and as a
plain single process, and check what each rank discovered and that the
collectives it then ran gave the right answers.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.cluster.fixtures import VENV_BIN, cluster_env
from conftest import ROOT, free_port
from user_dist.distributed import DistEnv, discover, first_slurm_host, strip_local_rank_arg

PROBE = os.path.join(ROOT, "tests", "dist_scripts", "probe.py")
# Generous: the first DeepSpeed start on a fresh venv JIT-compiles its CPU op.
RUN_TIMEOUT_S = 420


# -- discover() on each launcher's environment ---------------------------------

def test_deepspeed_launcher_environment():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29611",
           "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2"}
    assert discover(env) == DistEnv(3, 4, 1, "10.0.0.5", 29611, "deepspeed")


def test_torchrun_environment():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29700",
           "TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}
    assert discover(env) == DistEnv(1, 2, 1, "127.0.0.1", 29700, "torchrun")


def test_srun_task_environment_takes_master_from_the_nodelist_and_port_from_the_job_id():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_ID": "0",
           "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    assert discover(env) == DistEnv(3, 4, 1, "gpu07", 20000 + 123456 % 20000, "slurm")


def test_srun_task_uses_master_exported_by_the_sbatch_script():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7", "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "31000"}
    assert discover(env) == DistEnv(0, 2, 0, "10.1.1.1", 31000, "slurm")


def test_srun_step_smaller_than_the_job_counts_its_own_tasks():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_ID": "1",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7"}
    assert discover(env).world_size == 1
    assert discover(env).launcher == "single"


def test_sbatch_script_outside_srun_is_a_single_process():
    # The batch shell of a 2-task job: SLURM_PROCID=0 and SLURM_NTASKS=2 but no
    # step; treating it as rank 0 of 2 would wait forever for rank 1.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n[1-2]"}
    assert discover(env) == DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


def test_torchrun_inside_a_slurm_allocation_wins_over_slurm_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
           "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert discover(env) == DistEnv(5, 8, 1, "n1", 29500, "torchrun")


def test_plain_process_is_rank_0_of_1():
    assert discover({}) == DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


@pytest.mark.parametrize("argv, kept, local_rank", [
    (["--config", "c.yaml", "--local_rank=1", "a=b"], ["--config", "c.yaml", "a=b"], "1"),
    (["--local_rank", "3", "x=1"], ["x=1"], "3"),
    (["--local-rank=2"], [], "2"),
    (["--config", "c.yaml"], ["--config", "c.yaml"], None),
])
def test_strip_local_rank_arg_removes_deepspeeds_argument_and_keeps_the_rank(monkeypatch, argv, kept, local_rank):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank_arg(argv) == kept
    assert os.environ.get("LOCAL_RANK") == local_rank


NODELISTS = [
    ("node[01-04,07],gpu3", "node01"),
    ("gpu3,node[1-2]", "gpu3"),
    ("127.0.0.[1-2]", "127.0.0.1"),
    ("a-b[009-010]", "a-b009"),
    ("node[3,1]-ib", "node3-ib"),
    ("single", "single"),
]


@pytest.mark.parametrize("nodelist, first", NODELISTS)
def test_first_slurm_host_without_scontrol(monkeypatch, nodelist, first):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the built-in parser
    assert first_slurm_host(nodelist) == first


@pytest.mark.cluster
@pytest.mark.parametrize("nodelist, first", NODELISTS + [("rack[1-2]-n[07,09]", "rack1-n07")])
def test_first_slurm_host_agrees_with_scontrol(slurm_cluster, monkeypatch, nodelist, first):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    assert first_slurm_host(nodelist) == first
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_slurm_host(nodelist) == first


# -- real launchers, 2 ranks -----------------------------------------------------

def run_probe(argv, out, env=None, timeout_s=RUN_TIMEOUT_S):
    """Run a launcher command for the probe; returns the JSON lines it wrote."""
    cp = subprocess.run(argv, env=env or cluster_env(), cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout_s)
    assert cp.returncode == 0, f"{argv[0]} failed ({cp.returncode}):\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}"
    return read_records(out)


def read_records(path):
    with open(path) as f:
        return sorted((json.loads(line) for line in f), key=lambda r: r["rank"])


def assert_ranks_agree(records, world, launcher):
    """One record per rank, all seeing the same world, collectives correct."""
    assert [r["rank"] for r in records] == list(range(world))
    for r in records:
        assert (r["world"], r["launcher"], r["backend"]) == (world, launcher, "gloo"), r
        assert r["result"] == {"all_reduce": world * (world + 1) / 2, "all_reduce_ok": True,
                               "gather_ok": True, "grad_ok": True}, r


@pytest.mark.slow
def test_deepspeed_launcher_starts_two_cpu_ranks(tmp_path):
    out = tmp_path / "probe.jsonl"
    records = run_probe([os.path.join(VENV_BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                         PROBE, "--out", str(out)], out)
    assert_ranks_agree(records, 2, "deepspeed")
    assert [r["local_rank"] for r in records] == [0, 1]
    assert all("--local_rank" not in " ".join(r["argv"]) for r in records)  # stripped before parsing


@pytest.mark.slow
def test_torchrun_starts_two_cpu_ranks(tmp_path):
    out = tmp_path / "probe.jsonl"
    records = run_probe([os.path.join(VENV_BIN, "torchrun"), "--nproc_per_node", "2",
                         "--master_port", str(free_port()), PROBE, "--out", str(out)], out)
    assert_ranks_agree(records, 2, "torchrun")
    assert [r["local_rank"] for r in records] == [0, 1]


@pytest.mark.cluster
def test_srun_starts_one_rank_per_node_on_two_slurm_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "probe.jsonl"
    cp = slurm_cluster.srun([sys.executable, PROBE, "--out", str(out)],
                            options=["--nodes=2", "--ntasks=2", "--kill-on-bad-exit=1", f"--chdir={ROOT}"],
                            timeout_s=RUN_TIMEOUT_S)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    records = read_records(out)
    assert_ranks_agree(records, 2, "slurm")
    assert {r["slurm"]["SLURMD_NODENAME"] for r in records} == {"127.0.0.1", "127.0.0.2"}
    job_id = int(records[0]["slurm"]["SLURM_JOB_ID"])
    assert {(r["master_addr"], r["master_port"]) for r in records} == {("127.0.0.1", 20000 + job_id % 20000)}


@pytest.mark.slow
def test_plain_single_process_needs_no_launcher(tmp_path):
    out = tmp_path / "probe.jsonl"
    records = run_probe([sys.executable, PROBE, "--out", str(out)], out)
    assert_ranks_agree(records, 1, "single")
