"""The real-cluster harness works, and the product's launch scripts run on it.

- Slurm: launch/slurm/train.sbatch (entry pointed at the probe through the
  USER_DIST_ENTRY test hook) runs one rank per node on the two-node cluster,
  forwards the preemption signal and requeues itself; eval.sbatch picks
  watch mode or one checkpoint;
- pdsh: ``deepspeed --hostfile H --launcher pdsh`` runs 2 ranks on two hosts
  (network namespaces joined by a veth), and killing one rank makes the
  other fail fast with a clear error instead of hanging;
- TensorBoard: a real server reads back scalars written with SummaryWriter;
- the harness cleans up: no daemon, job step or namespace survives it.
"""
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, free_port
from tests.cluster.daemons import (INSTALL_COMMAND, NETNS_TOOLS, SLURM_TOOLS, HarnessError, in_netns, marked_pids,
                                   run, wait_until)
from tests.cluster.fixtures import REQUIRE_VAR, VENV_BIN, cluster_env, require_tools
from tests.cluster.pdsh import NetnsPair
from tests.cluster.slurm import SlurmCluster

PROBE = "tests/dist_scripts/probe.py"  # relative: the sbatch scripts run from the repo root
TRAIN_SBATCH = os.path.join(ROOT, "launch", "slurm", "train.sbatch")
EVAL_SBATCH = os.path.join(ROOT, "launch", "slurm", "eval.sbatch")
# The scripts' #SBATCH lines describe GPU nodes; the test nodes have 2 CPUs
# and no GPU: one task per node, overridden on the sbatch command line.
CPU_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
JOB_TIMEOUT_S = 240

pytestmark = pytest.mark.cluster


def read_records(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def results(records):
    """The per-rank check lines (not error/signal lines), by rank."""
    return sorted((r for r in records if "result" in r), key=lambda r: r["rank"])


def assert_two_ranks_ok(records):
    assert [r["rank"] for r in records] == [0, 1]
    for r in records:
        assert r["world"] == 2 and r["backend"] == "gloo", r
        assert r["result"] == {"all_reduce": 3.0, "all_reduce_ok": True, "gather_ok": True, "grad_ok": True}, r


# -- Slurm: launch/slurm/train.sbatch and eval.sbatch ----------------------------

def submit(cluster, script, args, options=()):
    return cluster.sbatch(script, args, options=options, env=dict(cluster.env, USER_DIST_ENTRY=PROBE), cwd=ROOT)


def test_train_sbatch_runs_one_rank_per_node_with_master_from_the_allocation(slurm_cluster, tmp_path):
    out = str(tmp_path / "probe.jsonl")
    job = submit(slurm_cluster, TRAIN_SBATCH, ["cfg.yaml", "train.epochs=3", "--out", out], CPU_NODES)
    result = slurm_cluster.wait(job, JOB_TIMEOUT_S)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), slurm_cluster.output(job)
    records = results(read_records(out))
    assert_two_ranks_ok(records)
    assert {r["slurm"]["SLURMD_NODENAME"] for r in records} == {"127.0.0.1", "127.0.0.2"}
    # MASTER_ADDR: first host of the allocation; MASTER_PORT: from the job id.
    port = 20000 + int(job) % 20000
    assert {(r["launcher"], r["master_addr"], r["master_port"]) for r in records} == {("slurm", "127.0.0.1", port)}
    # The config, resume=auto, then the user's overrides, in that order.
    assert records[0]["argv"] == ["--config", "cfg.yaml", "train.resume=auto", "train.epochs=3", "--out", out]


def test_train_sbatch_forwards_usr1_to_the_ranks_and_requeues_the_job(slurm_cluster, tmp_path):
    out, stop = str(tmp_path / "probe.jsonl"), str(tmp_path / "stop")
    # The ranks linger like a training loop; SIGUSR1 makes them exit 0 (as
    # train.py does after its checkpoint); the requeued run lingers until `stop`.
    job = submit(slurm_cluster, TRAIN_SBATCH,
                 ["cfg.yaml", "--out", out, "--linger", "200", "--signal-exit", "--stop-file", stop], CPU_NODES)
    try:
        wait_until(lambda: len(results(read_records(out))) == 2, JOB_TIMEOUT_S, "both ranks to start", poll_s=0.5)
        # What `#SBATCH --signal=B:USR1@120` does before the time limit: signal the batch shell only.
        run(["scancel", "--batch", "--signal=USR1", job], slurm_cluster.env)
        wait_until(lambda: sum("signal" in r for r in read_records(out)) == 2, 60,
                   "both ranks to receive the forwarded SIGUSR1", poll_s=0.5)
        # The harness cluster holds a requeued job 10 s (cred_expire), a real one ~2 min.
        wait_until(lambda: len(results(read_records(out))) == 4, JOB_TIMEOUT_S, "the requeued run's ranks",
                   poll_s=0.5)
    finally:
        open(stop, "w").close()
    result = slurm_cluster.wait(job, JOB_TIMEOUT_S)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 1), slurm_cluster.output(job)
    records = read_records(out)
    restart_counts = [r["slurm"]["SLURM_RESTART_COUNT"] for r in records if "result" in r]
    assert restart_counts[:2] in (["0", "0"], [None, None]) and restart_counts[2:] == ["1", "1"], records
    signals = [(r["rank"], r["signal"]) for r in records if "signal" in r]
    assert sorted(signals) == [(0, "SIGUSR1"), (1, "SIGUSR1")]
    assert "requeueing job" in slurm_cluster.output(job)


def test_train_sbatch_ends_the_job_fast_when_one_rank_dies(slurm_cluster, tmp_path):
    out = str(tmp_path / "probe.jsonl")
    group_timeout_s = 120
    job = submit(slurm_cluster, TRAIN_SBATCH,
                 ["cfg.yaml", "--out", out, "--linger", "200", "--timeout", str(group_timeout_s)], CPU_NODES)
    wait_until(lambda: len(results(read_records(out))) == 2, JOB_TIMEOUT_S, "both ranks to start", poll_s=0.5)
    os.kill(results(read_records(out))[1]["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    result = slurm_cluster.wait(job, group_timeout_s)
    took_s = time.monotonic() - killed_at
    assert result.state == "FAILED" and result.exit_code != 0, slurm_cluster.output(job)
    # srun --kill-on-bad-exit ends the step at once, long before a collective timeout.
    assert took_s < group_timeout_s / 4, f"took {took_s:.0f} s:\n{slurm_cluster.output(job)}"
    assert "task 1: Killed" in slurm_cluster.output(job)


@pytest.mark.parametrize("complete, expect", [(False, ["--run-dir", "RUN", "--watch"]),
                                              (True, ["--checkpoint", "CKPT"])])
def test_eval_sbatch_watches_a_run_or_evaluates_one_complete_checkpoint(slurm_cluster, tmp_path, complete, expect):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    if complete:
        (ckpt / "COMPLETE").write_text('{"step": 10, "epoch": 0}')
    target = str(ckpt if complete else run_dir)
    out = str(tmp_path / "probe.jsonl")
    job = submit(slurm_cluster, EVAL_SBATCH, [target, "--no-deepspeed", "--out", out],
                 ["--gpus-per-node=0", "--cpus-per-task=1"])
    result = slurm_cluster.wait(job, JOB_TIMEOUT_S)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), slurm_cluster.output(job)
    [record] = read_records(out)
    assert (record["world"], record["launcher"]) == (1, "single")
    expect = [{"RUN": str(run_dir), "CKPT": str(ckpt)}.get(a, a) for a in expect]
    assert record["argv"] == expect + ["--no-deepspeed", "--out", out]


def test_waiting_on_a_job_that_ends_first_fails_at_once_and_says_why(slurm_cluster, tmp_path):
    script = tmp_path / "fails.sh"
    script.write_text("#!/bin/bash\necho 'the job ran and gave up'\nexit 3\n")
    job = slurm_cluster.sbatch(str(script), options=["--nodes=1", "--ntasks-per-node=1"])
    started = time.monotonic()
    with pytest.raises(HarnessError) as err:
        slurm_cluster.wait_for(job, lambda: os.path.exists(tmp_path / "never"), JOB_TIMEOUT_S, "a file")
    assert time.monotonic() - started < 30  # not the whole timeout
    message = str(err.value)
    assert f"Slurm job {job} ended before a file" in message
    assert "state: FAILED" in message and "exit: 3:0" in message and "the job ran and gave up" in message
    assert "node states:" in message and "slurmctld.log (tail)" in message


def sleeps(mark):
    """Pids of the marked `sleep` tasks."""
    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().split(b"\0")[0]
        except OSError:
            return b""
    return [p for p in marked_pids(mark) if os.path.basename(cmdline(p)) == b"sleep"]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, only not reaped yet


def test_slurm_cluster_stop_ends_daemons_and_running_jobs(tmp_path):
    require_tools(SLURM_TOOLS)
    cluster = SlurmCluster(str(tmp_path / "slurm"), cluster_env(), [free_port() for _ in range(3)]).start()
    try:
        script = tmp_path / "sleep.sh"
        script.write_text("#!/bin/bash\nsrun sleep 300\n")
        cluster.sbatch(str(script), options=["--nodes=2", "--ntasks-per-node=1"])
        tasks = wait_until(lambda: len(sleeps(cluster.mark)) == 2 and sleeps(cluster.mark), 60,
                           "the job's two tasks to run")
        daemons = [d.proc.pid for d in cluster._daemons]
    finally:
        cluster.stop()
    assert len(daemons) == 4  # munged, slurmctld, two slurmd
    assert [pid for pid in tasks + daemons if alive(pid)] == []


# -- pdsh: deepspeed's multi-node launcher across two namespaced hosts ----------

def pdsh_launch(hosts, probe_args, **popen):
    argv = hosts.deepspeed_argv(os.path.join(VENV_BIN, "deepspeed"), free_port(), PROBE, probe_args)
    return subprocess.Popen(in_netns(hosts.launch_netns, argv), env=hosts.launcher_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_deepspeed_pdsh_launcher_runs_one_rank_on_each_namespaced_host(pdsh_hosts, tmp_path):
    out = str(tmp_path / "probe.jsonl")
    proc = pdsh_launch(pdsh_hosts, ["--out", out])
    try:
        log, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-4000:]
    records = results(read_records(out))
    assert_two_ranks_ok(records)
    namespaces = [os.stat(f"/run/netns/{n}").st_ino for n in pdsh_hosts.netns.names]
    assert [r["netns"] for r in records] == namespaces  # rank 0 on host 1, rank 1 on host 2
    assert {(r["launcher"], r["master_addr"], r["env"]["GLOO_SOCKET_IFNAME"]) for r in records} == {
        ("deepspeed", pdsh_hosts.master_addr, "clus0")}


def test_killing_one_rank_makes_the_other_host_fail_fast_with_a_clear_error(pdsh_hosts, tmp_path):
    out = str(tmp_path / "probe.jsonl")
    group_timeout_s = 60
    proc = pdsh_launch(pdsh_hosts, ["--out", out, "--linger", "120", "--timeout", str(group_timeout_s)])
    try:
        wait_until(lambda: proc.poll() is not None or len(results(read_records(out))) == 2, JOB_TIMEOUT_S,
                   "both ranks to start", poll_s=0.5)
        victim = results(read_records(out))[1]
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        log, _ = proc.communicate(timeout=2 * group_timeout_s)
        took_s = time.monotonic() - killed_at
    finally:
        proc.kill()
    assert proc.returncode != 0, log[-4000:]
    # Far sooner than the process-group timeout: the survivor's next collective fails at once.
    assert took_s < group_timeout_s / 2, f"the job took {took_s:.0f} s to fail:\n{log[-4000:]}"
    [error] = [r for r in read_records(out) if "error" in r]
    assert error["rank"] == 0
    # gloo names the dead peer: "Connection closed by peer [10.200.0.2]:..." or
    # "Read error [10.200.0.2]:...: Connection reset by peer".
    assert f"[{pdsh_hosts.netns.addresses[1]}]:" in error["error"], error
    assert "Connection closed by peer" in error["error"] or "Connection reset by peer" in error["error"], error


def test_netns_pair_is_deleted_with_its_link():
    require_tools(NETNS_TOOLS)
    pair = NetnsPair(cluster_env())
    try:
        links = [run(["ip", "-br", "addr", "show", "clus0"], {}, netns=n).stdout for n in pair.names]
    finally:
        pair.delete()
    assert [link.split()[2] for link in links] == ["10.200.0.1/24", "10.200.0.2/24"]
    listed = run(["ip", "netns", "list"], {}).stdout
    assert not any(n in listed for n in pair.names)


# -- without the packages: a skip that says how to install them, or a failure in CI --------

def test_a_missing_program_skips_the_test_naming_the_install_command(monkeypatch):
    monkeypatch.delenv(REQUIRE_VAR, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_tools(["/nonexistent/slurmctld"])
    assert str(skipped.value) == f"slurmctld not found; install with: {INSTALL_COMMAND}"


def test_user_dist_require_cluster_turns_the_skip_into_a_failure(monkeypatch):
    monkeypatch.setenv(REQUIRE_VAR, "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        require_tools(["/nonexistent/slurmctld"])
    assert INSTALL_COMMAND in str(failed.value) and REQUIRE_VAR in str(failed.value)


# -- TensorBoard ------------------------------------------------------------------

def test_tensorboard_serves_back_scalars_written_with_summarywriter(tensorboard_server, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "tb"
    with SummaryWriter(str(logdir / "before")) as w:
        for step in range(5):
            w.add_scalar("train/loss", 1.0 / (step + 1), step)
    tb = tensorboard_server(str(logdir))
    points = tb.wait_for_scalars("before", "train/loss", 5)
    assert [(step, value) for _, step, value in points] == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)]
    # A run written while the server is up shows up too.
    with SummaryWriter(str(logdir / "after")) as w:
        w.add_scalar("eval/rsum", 42.5, 100)
    [(_, step, value)] = tb.wait_for_scalars("after", "eval/rsum", 1)
    assert (step, value) == (100, 42.5)
    assert set(tb.runs()) == {"before", "after"}
    assert set(tb.tags()["before"]) == {"train/loss"}
