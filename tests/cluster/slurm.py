"""A real two-node Slurm cluster on this machine, in a temporary folder.

munged runs with its own key and socket; slurmctld and two slurmd run in the
foreground as children of the test, named ``127.0.0.1`` and ``127.0.0.2`` so
that ``scontrol show hostnames $SLURM_JOB_NODELIST | head -1`` is an address
the ranks can reach. Client commands find the cluster through
``SLURM_CONF`` in :attr:`SlurmCluster.env`.

    cluster = SlurmCluster(tmpdir); cluster.start()
    job = cluster.sbatch("launch/slurm/train.sbatch", ["cfg.yaml"], nodes=2)
    result = cluster.wait(job, timeout_s=120)   # JobResult(state, exit_code, ...)
    cluster.stop()
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from tests.cluster.daemons import (MARK, SLURM_TOOLS, Daemon, HarnessError, check_tools, kill_marked, run, tail,
                                   wait_until)

NODES = ("127.0.0.1", "127.0.0.2")
CPUS_PER_NODE = 2

SLURM_CONF = """\
ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again
# (default 120 s); a start before that is refused as "credential revoked".
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={sockets}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# A partitioned node must not requeue its job (it would then wait forever);
# jobs submitted with --requeue still requeue themselves.
JobRequeue=0
SlurmdTimeout=30
# Cancelled tasks get SIGKILL 2 s after SIGTERM (default 30 s).
KillWait=2
# Job ids (and so the MASTER_PORT derived from them) differ between clusters.
FirstJobId={first_job_id}
{node_lines}
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass(frozen=True)
class JobResult:
    job_id: str
    state: str  # COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL ...
    exit_code: int  # the batch script's exit status
    signal: int  # the signal that ended it, 0 if none
    restarts: int  # how often it was requeued
    info: Dict[str, str]  # every field of `scontrol show job`


def _parse_scontrol(text: str) -> Dict[str, str]:
    """``Key=Value Key2=Value2`` (one-liner output of ``scontrol -o``) -> dict."""
    return dict(m.groups() for m in re.finditer(r"(\S+?)=(\S*)", text))


class SlurmCluster:
    def __init__(self, root: str, base_env: dict, ports: Sequence[int]):
        """``root``: an empty folder for keys, state, spool and logs;
        ``base_env``: the environment clients and jobs start from;
        ``ports``: three free TCP ports (slurmctld, then one per slurmd)."""
        self.root = os.path.abspath(root)
        self.mark = f"slurm-{os.path.basename(self.root)}-{os.getpid()}"
        self.conf = os.path.join(self.root, "slurm.conf")
        # Unix sockets (munged's, slurmstepd's in the spool) need a path under
        # 108 bytes, which a pytest tmp_path can exceed: keep them in /tmp.
        self.sockets = tempfile.mkdtemp(prefix="uds-", dir="/tmp")
        self.munge_socket = os.path.join(self.sockets, "munge.socket")
        self.env = dict(base_env, SLURM_CONF=self.conf, **{MARK: self.mark})
        self._ports = list(ports)
        self._daemons: List[Daemon] = []

    # -- life cycle -------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> "SlurmCluster":
        check_tools(SLURM_TOOLS)
        try:
            self._write_config()
            self._start_munge(timeout_s)
            ctld = self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
            wait_until(lambda: ctld.check_alive() or run(["scontrol", "ping"], self.env, check=False)
                       .stdout.count("UP") > 0, timeout_s, "slurmctld to answer", log=ctld.log)
            for node in NODES:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", self.conf, "-N", node])
            wait_until(self._nodes_idle, timeout_s, "both slurmd to register idle",
                       log=os.path.join(self.root, "slurmctld.log"))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons, kill whatever they left behind."""
        if any(d.proc.poll() is None for d in self._daemons):
            run(["scancel", "--full", "--partition", "ci"], self.env, check=False)
        for d in reversed(self._daemons):
            d.stop()
        self._daemons = []
        kill_marked(self.mark)
        shutil.rmtree(self.sockets, ignore_errors=True)

    def _spawn(self, name: str, argv: List[str]) -> Daemon:
        d = Daemon(name, argv, os.path.join(self.root, f"{name}.out"), self.env)
        self._daemons.append(d)
        return d

    def _write_config(self) -> None:
        for sub in ("state", "munge"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        for node in NODES:
            os.makedirs(os.path.join(self.sockets, "spool", node), exist_ok=True)
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname=localhost Port={port} CPUs={CPUS_PER_NODE} RealMemory=1000"
            for node, port in zip(NODES, self._ports[1:]))
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(ctld_port=self._ports[0], root=self.root, sockets=self.sockets,
                                      munge_socket=self.munge_socket,
                                      first_job_id=random.randrange(1000, 60000), node_lines=node_lines))

    def _start_munge(self, timeout_s: float) -> None:
        munge_dir = os.path.join(self.root, "munge")
        key = os.path.join(munge_dir, "munge.key")
        run(["mungekey", "--create", "--keyfile", key], self.env)
        os.chmod(munge_dir, 0o700)
        d = self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid",
                                   f"--seed-file={munge_dir}/munged.seed", f"--log-file={munge_dir}/munged.log"])
        wait_until(lambda: d.check_alive() or os.path.exists(self.munge_socket), timeout_s,
                   "munged's socket", log=d.log)

    def _nodes_idle(self) -> bool:
        for d in self._daemons:
            d.check_alive()
        out = run(["sinfo", "-h", "-N", "-o", "%N %T"], self.env, check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in NODES)

    # -- jobs ---------------------------------------------------------------
    def sbatch(self, script: str, args: Sequence[str] = (), options: Sequence[str] = (),
               env: Optional[dict] = None, cwd: Optional[str] = None) -> str:
        """Submit ``script args`` with extra sbatch ``options``; returns the job id.

        The job's output goes to ``<root>/job-<id>.out`` (see :meth:`output`).
        """
        cp = run(["sbatch", "--parsable", f"--output={self.root}/job-%j.out", *options, script, *args],
                 self._job_env(env), cwd=cwd)
        return cp.stdout.strip().split(";")[0]

    def srun(self, argv: Sequence[str], options: Sequence[str] = (), env: Optional[dict] = None,
             timeout_s: float = 120.0):
        """Run ``srun options argv`` in the foreground (its own allocation); CompletedProcess."""
        return run(["srun", *options, *argv], self._job_env(env), timeout_s=timeout_s, check=False)

    def _job_env(self, env: Optional[dict]) -> dict:
        # The cluster's SLURM_CONF and marker always win: jobs must be
        # findable by kill_marked() and talk to this cluster only.
        return dict(env or self.env, SLURM_CONF=self.conf, **{MARK: self.mark})

    def job_info(self, job_id: str) -> Dict[str, str]:
        """Fields of ``scontrol show job`` (kept MinJobAge = 300 s after the end)."""
        cp = run(["scontrol", "-o", "show", "job", job_id], self.env, check=False)
        return _parse_scontrol(cp.stdout) if cp.returncode == 0 else {}

    def _gone(self, job_id: str) -> bool:
        """Whether the job has left the queue (a requeued job has not)."""
        for d in self._daemons:
            d.check_alive()
        cp = run(["squeue", "-h", "-j", job_id, "-o", "%T"], self.env, check=False)
        return cp.returncode == 0 and not cp.stdout.strip()

    def wait(self, job_id: str, timeout_s: float) -> JobResult:
        """Poll squeue until the job has left the queue (requeues included);
        cancel it and raise if it takes longer than ``timeout_s``."""
        try:
            wait_until(lambda: self._gone(job_id), timeout_s, f"Slurm job {job_id} to finish", poll_s=0.5)
        except HarnessError as e:
            report = self.diagnosis(job_id)
            run(["scancel", job_id], self.env, check=False)
            raise HarnessError(f"{e}\n{report}") from None
        info = self.job_info(job_id)
        code, _, sig = info.get("ExitCode", "-1:0").partition(":")
        return JobResult(job_id, info.get("JobState", "UNKNOWN"), int(code), int(sig or 0),
                         int(info.get("Restarts", 0)), info)

    def wait_for(self, job_id: str, check, timeout_s: float, what: str):
        """Poll ``check()`` while the job runs; return its first truthy value.

        Raises at once if the job leaves the queue first, and after
        ``timeout_s`` otherwise (cancelling the job), with :meth:`diagnosis`
        in the message: a job that failed or never started is named as such,
        not as a long wait for a file.
        """
        def ready():
            value = check()
            if value:
                return value
            if self._gone(job_id):
                value = check()  # it may have finished between the two looks
                if value:
                    return value
                raise HarnessError(f"Slurm job {job_id} ended before {what}\n{self.diagnosis(job_id)}")
            return None
        try:
            return wait_until(ready, timeout_s, what, poll_s=0.5)
        except HarnessError as e:
            if "ended before" in str(e):
                raise
            report = self.diagnosis(job_id)
            run(["scancel", job_id], self.env, check=False)
            raise HarnessError(f"{e}\n{report}") from None

    def diagnosis(self, job_id: str) -> str:
        """What a failed wait needs: the job's state and reason, the nodes'
        states and drain reasons, the job's output and the daemons' log tails."""
        info = self.job_info(job_id)
        nodes = run(["sinfo", "-h", "-N", "-o", "%N %T %E"], self.env, check=False).stdout.strip()
        logs = "".join(f"--- {name} (tail):\n{tail(os.path.join(self.root, name), 15)}"
                       for name in ("slurmctld.log", *(f"slurmd-{n}.log" for n in NODES)))
        return (f"job {job_id} state: {info.get('JobState')} reason: {info.get('Reason')} "
                f"exit: {info.get('ExitCode')} nodes: {info.get('NodeList')}\n"
                f"node states:\n{nodes}\n--- job output:\n{self.output(job_id)[-6000:]}\n{logs}")

    def output(self, job_id: str) -> str:
        path = os.path.join(self.root, f"job-{job_id}.out")
        if not os.path.exists(path):
            return "(no output file)"
        with open(path, errors="replace") as f:
            return f.read()
