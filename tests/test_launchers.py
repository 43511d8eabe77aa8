"""Rank/world discovery works unchanged under every launcher.

Unit tests feed discover() the environment each launcher really sets; the
real runs start tests/dist_scripts/probe.py with 2 ranks under deepspeed,
torchrun and Slurm's srun (a two-node cluster on this machine), and as a
plain single process, and check what each rank discovered and that the
collectives it then ran gave the right answers.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cluster.daemons import wait_until
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


def read_records_raw(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_records(path):
    """The ranks' check lines (not their error lines), by rank."""
    return sorted((r for r in read_records_raw(path) if "result" in r), key=lambda r: r["rank"])


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


# -- start-up on a loaded machine ------------------------------------------------

def listening(port):
    """Whether some process listens on TCP ``port`` (read from /proc: connecting
    to rank 0's store would count as a client)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


@pytest.mark.slow
def test_start_up_waits_for_a_late_rank_while_collectives_keep_their_short_timeout(tmp_path):
    """Ranks reach the process group far apart on a loaded machine: start-up
    waits for the late one (user_dist.distributed.CONNECT_TIMEOUT_S) although
    the collective timeout is shorter; a frozen peer is still noticed after
    the collective timeout."""
    timeout_s, port, out = 5, free_port(), str(tmp_path / "probe.jsonl")

    def start(rank):
        env = cluster_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        return subprocess.Popen([sys.executable, PROBE, "--out", out, "--no-deepspeed", "--timeout", str(timeout_s),
                                 "--linger", "120"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    ranks = [start(0)]
    try:
        wait_until(lambda: ranks[0].poll() is not None or listening(port), RUN_TIMEOUT_S, "rank 0's store")
        time.sleep(timeout_s + 3)  # rank 0 waits in start-up for longer than the collective timeout
        ranks.append(start(1))
        wait_until(lambda: ranks[0].poll() is not None or len(read_records(out)) == 2, RUN_TIMEOUT_S,
                   "both ranks to start")
        assert ranks[0].poll() is None, ranks[0].communicate()[0][-3000:]
        assert_ranks_agree(read_records(out), 2, "torchrun")
        os.kill(ranks[1].pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        log, _ = ranks[0].communicate(timeout=RUN_TIMEOUT_S)
        took_s = time.monotonic() - frozen_at
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert ranks[0].returncode != 0, log[-3000:]
    [error] = [r for r in read_records_raw(out) if "error" in r]
    assert error["rank"] == 0 and f"Timed out waiting {timeout_s * 1000}ms" in error["error"], error
    assert timeout_s <= took_s < timeout_s + 30, took_s
