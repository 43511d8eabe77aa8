"""Hosts for DeepSpeed's multi-node launcher (``--launcher pdsh``), for real.

- :class:`SshServer`: sshd with a generated host key and one root key of
  its own (``UsePAM no``, ``StrictModes no``), on loopback or inside a
  network namespace; every session it starts carries the harness marker.
- :class:`NetnsPair`: two "hosts", network namespaces joined by one veth
  pair whose link has the same name in both (10.200.0.1/24, 10.200.0.2/24),
  so ranks reach each other over a real link with ``GLOO_SOCKET_IFNAME``.
- :class:`PdshHosts`: both together, plus the hostfile, the
  ``.deepspeed_env`` file (only MLFLOW*/PYTHON*/MV2*/UCX* variables reach
  remote ranks on their own) and the launcher's environment.

Traffic only ever goes to loopback or to the namespaces made here.
"""
from __future__ import annotations

import itertools
import os
import shutil
from typing import Dict, List, Optional, Sequence

from tests.cluster.daemons import MARK, NETNS_TOOLS, Daemon, check_tools, kill_marked, run, wait_until

SSHD = "/usr/sbin/sshd"
LINK = "clus0"  # the veth end's name inside each namespace
SUBNET = "10.200.0"
_serial = itertools.count()

SSHD_CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PidFile {pid_file}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
# Sessions carry the harness marker, so whatever they start can be found and ended.
SetEnv {mark_var}={mark}
"""


def generate_key(path: str, env: dict) -> str:
    """An unencrypted ed25519 key pair at path / path.pub; returns path."""
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "user-dist-test", "-f", path], env)
    return path


class SshServer:
    """sshd on ``address:port`` (inside ``netns`` if given), accepting ``client_key``."""

    def __init__(self, root: str, address: str, port: int, client_key: str, env: dict, mark: str,
                 netns: Optional[str] = None):
        check_tools((SSHD, "ssh-keygen", "ssh"))
        self.address, self.port, self.netns = address, port, netns
        name = f"sshd-{address}-{port}"
        host_key = generate_key(os.path.join(root, f"{name}.hostkey"), env)
        authorized = os.path.join(root, "authorized_keys")
        shutil.copyfile(client_key + ".pub", authorized)
        conf = os.path.join(root, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(SSHD_CONFIG.format(port=port, address=address, host_key=host_key, authorized_keys=authorized,
                                       pid_file=os.path.join(root, f"{name}.pid"), mark_var=MARK, mark=mark))
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        # -D: foreground (a child of the test), -e: log to the log file.
        self.daemon = Daemon(name, [SSHD, "-D", "-e", "-f", conf], os.path.join(root, f"{name}.log"),
                             dict(env, **{MARK: mark}), netns=netns)

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        def listening() -> bool:
            self.daemon.check_alive()
            probe = ["bash", "-c", f"exec 3<>/dev/tcp/{self.address}/{self.port}"]
            return run(probe, {}, netns=self.netns, check=False).returncode == 0
        wait_until(listening, timeout_s, f"sshd on {self.address}:{self.port}", log=self.daemon.log)

    def stop(self) -> None:
        self.daemon.stop()


class NetnsPair:
    """Two network namespaces joined by a veth pair (root only)."""

    def __init__(self, env: dict):
        check_tools(NETNS_TOOLS)
        n = f"{os.getpid() % 100000}{next(_serial)}"
        self.names = [f"udh1-{n}", f"udh2-{n}"]
        self.addresses = [f"{SUBNET}.1", f"{SUBNET}.2"]
        self.env = env
        self._made: List[str] = []
        try:
            self._create(n)
        except BaseException:
            self.delete()
            raise

    def _create(self, n: str) -> None:
        # Veth names are global until moved, and at most 15 characters.
        ends = [f"ud{n}a", f"ud{n}b"]
        for ns in self.names:
            run(["ip", "netns", "add", ns], self.env)
            self._made.append(ns)
        run(["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]], self.env)
        for ns, end, addr in zip(self.names, ends, self.addresses):
            run(["ip", "link", "set", end, "netns", ns], self.env)
            for cmd in (["ip", "link", "set", end, "name", LINK], ["ip", "addr", "add", f"{addr}/24", "dev", LINK],
                        ["ip", "link", "set", LINK, "up"], ["ip", "link", "set", "lo", "up"]):
                run(cmd, self.env, netns=ns)

    def delete(self) -> None:
        """Delete the namespaces (the veth pair goes with them). Kill their processes first."""
        for ns in self._made:
            run(["ip", "netns", "del", ns], self.env, check=False)
        self._made = []


class PdshHosts:
    """Two namespaced hosts, each with sshd on port 22, ready for
    ``deepspeed --hostfile H --launcher pdsh --no_ssh_check`` run from host 1."""

    def __init__(self, root: str, env: dict, extra_rank_env: Dict[str, str]):
        """``env``: the launcher's base environment (PATH must find the venv's
        python, deepspeed and ninja); ``extra_rank_env``: variables the remote
        ranks need besides PYTHON* (GLOO_SOCKET_IFNAME is added here)."""
        self.root = os.path.abspath(root)
        self.mark = f"pdsh-{os.path.basename(self.root)}-{os.getpid()}"
        base = dict(env, **{MARK: self.mark})
        self.servers: List[SshServer] = []
        self.netns = NetnsPair(base)
        try:
            self.key = generate_key(os.path.join(self.root, "id_ed25519"), base)
            for ns, addr in zip(self.netns.names, self.netns.addresses):
                self.servers.append(SshServer(self.root, addr, 22, self.key, base, self.mark, netns=ns))
            for s in self.servers:
                s.wait_ready()
            self.hostfile = write_hostfile(os.path.join(self.root, "hostfile"), self.netns.addresses)
            # Remote sessions start from sshd's bare environment: the ranks'
            # PATH (python, ninja for DeepSpeed's op cache) and gloo's link
            # come from this file (read through DS_ENV_FILE).
            rank_env = {"PATH": env["PATH"], "GLOO_SOCKET_IFNAME": LINK, **extra_rank_env}
            self.ds_env_file = write_deepspeed_env(os.path.join(self.root, "deepspeed_env"), rank_env)
            ssh_args = (f"-i {self.key} -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no "
                        f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
            self.launcher_env = dict(base, DS_ENV_FILE=self.ds_env_file, PDSH_SSH_ARGS_APPEND=ssh_args,
                                     GLOO_SOCKET_IFNAME=LINK)
        except BaseException:
            self.stop()
            raise

    @property
    def master_addr(self) -> str:
        return self.netns.addresses[0]

    @property
    def launch_netns(self) -> str:
        """Where the launcher runs: host 1."""
        return self.netns.names[0]

    def deepspeed_argv(self, deepspeed: str, master_port: int, script: str, args: Sequence[str]) -> List[str]:
        return [deepspeed, "--hostfile", self.hostfile, "--launcher", "pdsh", "--no_ssh_check",
                "--master_addr", self.master_addr, "--master_port", str(master_port), script, *args]

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers = []
        kill_marked(self.mark)
        self.netns.delete()


def write_hostfile(path: str, hosts: Sequence[str], slots: int = 1) -> str:
    """DeepSpeed hostfile: ``HOST slots=N`` per line."""
    with open(path, "w") as f:
        f.writelines(f"{h} slots={slots}\n" for h in hosts)
    return path


def write_deepspeed_env(path: str, variables: Dict[str, str]) -> str:
    """``KEY=VALUE`` lines the deepspeed runner exports to every remote rank."""
    with open(path, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in variables.items())
    return path
