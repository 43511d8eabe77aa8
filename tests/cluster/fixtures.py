"""pytest fixtures for the real-cluster harness (imported by tests/conftest.py).

All are marked-test fixtures: they start daemons or namespaces, so only tests
marked ``@pytest.mark.cluster`` use them. Each one stops what it started,
even when the test fails.

Without the Debian packages (or root) a test that needs them skips, with the
install command as its reason; ``USER_DIST_REQUIRE_CLUSTER=1`` (set by
.ci/run) turns that skip into a failure, so CI never passes without them.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import pytest

from tests.cluster.daemons import PDSH_TOOLS, SLURM_TOOLS, missing_tools
from tests.cluster.pdsh import PdshHosts
from tests.cluster.slurm import SlurmCluster
from tests.cluster.tensorboard import TensorBoardServer

VENV_BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    from conftest import free_port  # at call time: conftest imports this module

    return free_port()


REQUIRE_VAR = "USER_DIST_REQUIRE_CLUSTER"


def cluster_required() -> bool:
    return os.environ.get(REQUIRE_VAR, "") not in ("", "0")


def require_tools(tools: Sequence[str]) -> None:
    """Skip the calling test when the harness cannot start ``tools`` here
    (the reason names the install command), or fail under
    USER_DIST_REQUIRE_CLUSTER=1. Call it before starting anything."""
    problem = missing_tools(tools)
    if problem is None:
        return
    if cluster_required():
        pytest.fail(f"{problem} ({REQUIRE_VAR}=1: the cluster tests are mandatory here)", pytrace=False)
    pytest.skip(problem)


def cluster_env(**extra: str) -> dict:
    """child_env() with the venv's bin first on PATH, the way an activated
    venv (and launch/slurm/*.sbatch) runs: `python` is this interpreter, and
    DeepSpeed's op cache is always built and checked by the same ninja."""
    from conftest import child_env  # at call time: conftest imports this module

    env = child_env(**extra)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = os.path.dirname(VENV_BIN)
    return env


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node Slurm cluster (nodes 127.0.0.1 and 127.0.0.2)."""
    require_tools(SLURM_TOOLS)
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")), cluster_env(),
                           [_free_port() for _ in range(3)]).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pdsh_hosts(tmp_path_factory):
    """Two hosts in network namespaces with sshd, a hostfile and a
    .deepspeed_env for ``deepspeed --launcher pdsh`` run from host 1."""
    require_tools(PDSH_TOOLS)
    env = cluster_env()
    hosts = PdshHosts(str(tmp_path_factory.mktemp("pdsh")), env,
                      {k: env[k] for k in ("TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "VIRTUAL_ENV")})
    yield hosts
    hosts.stop()


@pytest.fixture
def tensorboard_server(tmp_path):
    """Factory: ``tensorboard_server(logdir)`` -> a started TensorBoardServer."""
    servers = []

    def start(logdir: str) -> TensorBoardServer:
        tb = TensorBoardServer(logdir, _free_port(), str(tmp_path / f"tensorboard-{len(servers)}.log"),
                               cluster_env())
        servers.append(tb)
        return tb.start()

    yield start
    for tb in servers:
        tb.stop()
