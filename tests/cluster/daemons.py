"""Start, wait for and stop the real daemons the cluster tests need.

Every process the harness starts carries a marker variable in its
environment (``USER_DIST_HARNESS=<id>``), and so do the processes those
daemons start for us (Slurm job steps inherit it from the submitter, pdsh
ranks get it through ``.deepspeed_env``). :func:`kill_marked` ends exactly
those processes, by pid, even when a daemon has already died and left its
children behind; it never touches anything else on the machine.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Callable, List, Optional, Sequence

MARK = "USER_DIST_HARNESS"

# The Debian packages behind every program the harness starts, in one command
# (.ci/run runs it; a machine without them skips the cluster tests, naming it).
INSTALL_COMMAND = "apt-get install -y slurmctld slurmd slurm-client munge openssh-server pdsh iproute2"
SLURM_TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol",
               "scancel")
NETNS_TOOLS = ("ip", "nsenter")
PDSH_TOOLS = NETNS_TOOLS + ("pdsh", "/usr/sbin/sshd", "ssh", "ssh-keygen")


class HarnessError(RuntimeError):
    """A daemon did not start, or a wait ran out; the message says which and where its log is."""


def missing_tools(tools: Sequence[str]) -> Optional[str]:
    """Why the harness cannot start ``tools`` on this machine (one line, naming
    the install command), or None when it can. It runs them as root: Slurm's
    daemons run as SlurmUser=root, and network namespaces need it."""
    absent = [os.path.basename(t) for t in tools if shutil.which(t) is None]
    if absent:
        return f"{', '.join(absent)} not found; install with: {INSTALL_COMMAND}"
    if os.geteuid() != 0:
        return "the cluster harness runs as root (Slurm daemons as SlurmUser=root, network namespaces)"
    return None


def check_tools(tools: Sequence[str]) -> None:
    """Raise HarnessError naming what is missing (see :func:`missing_tools`)."""
    problem = missing_tools(tools)
    if problem:
        raise HarnessError(problem)


def wait_until(check: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2,
               log: Optional[str] = None):
    """Call ``check`` until it returns a truthy value (returned) or ``timeout_s`` passes (raises)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            hint = f"; see {log}:\n{tail(log)}" if log else ""
            raise HarnessError(f"timed out after {timeout_s:.0f} s waiting for {what}{hint}")
        time.sleep(poll_s)


def tail(path: Optional[str], lines: int = 20) -> str:
    if not path or not os.path.exists(path):
        return "(no log)"
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def in_netns(netns: Optional[str], argv: Sequence[str]) -> List[str]:
    """argv run inside network namespace ``netns`` (None: this one).

    nsenter, not ``ip netns exec``: the latter remounts /sys, and slurmd then
    fails its cgroup set-up.
    """
    return list(argv) if netns is None else ["nsenter", f"--net=/run/netns/{netns}", *argv]


class Daemon:
    """One long-running process kept in the foreground, its output in ``log``."""

    def __init__(self, name: str, argv: Sequence[str], log: str, env: dict, netns: Optional[str] = None):
        self.name, self.log = name, log
        with open(log, "ab") as out:
            # Its own session: a signal aimed at the test runner's process
            # group does not reach it, and stop() can end its group.
            self.proc = subprocess.Popen(in_netns(netns, argv), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise HarnessError(f"{self.name} exited with {self.proc.returncode}; "
                               f"see {self.log}:\n{tail(self.log)}")

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(grace_s)


def marked_pids(mark: str) -> List[int]:
    """Pids of live processes whose environment holds ``USER_DIST_HARNESS=<mark>``."""
    needle = f"{MARK}={mark}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return pids


def kill_marked(mark: str, timeout_s: float = 10.0) -> None:
    """SIGKILL every process carrying ``mark`` and wait until they are gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = marked_pids(mark)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {pids} marked {MARK}={mark} survive SIGKILL")
        time.sleep(0.1)


def run(argv: Sequence[str], env: dict, timeout_s: float = 30.0, netns: Optional[str] = None,
        check: bool = True, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run a short command (a client, ``ip``, a key generator), output captured."""
    cp = subprocess.run(in_netns(netns, argv), env=env, capture_output=True, text=True, timeout=timeout_s,
                        cwd=cwd)
    if check and cp.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({cp.returncode}):\n{cp.stdout}{cp.stderr}")
    return cp
