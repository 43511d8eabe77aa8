"""Shared test fixtures: free ports, a clean environment for child processes."""
import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def pytest_report_header(config) -> list:
    """Free disk where the tests write: the job tests save real checkpoints,
    and a nearly full disk shows up as refused saves, not as a crash. And
    whether the cluster tests will run, skip or fail (see tests/cluster/fixtures.py)."""
    import shutil
    import tempfile

    lines = []
    for where in (tempfile.gettempdir(), ROOT):
        free_gb = shutil.disk_usage(where).free / 2**30
        lines.append(f"free disk under {where}: {free_gb:.1f} GiB")
        if free_gb < 2:
            lines.append(f"WARNING: under 2 GiB free under {where}; the job tests need a few hundred MB "
                         "and will fail with 'not enough free space for checkpoint'")
    from tests.cluster.daemons import PDSH_TOOLS, SLURM_TOOLS, missing_tools
    from tests.cluster.fixtures import cluster_required

    problem = missing_tools(SLURM_TOOLS + PDSH_TOOLS)
    if problem:
        lines.append(f"cluster tests: {'FAIL' if cluster_required() else 'skip'} ({problem})")
    else:
        lines.append(f"cluster tests: Slurm, munge, sshd, pdsh found{' (required)' if cluster_required() else ''}")
    return lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """Environment for a child process: the repo importable, no inherited ranks."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # The venv's tools first: torch builds DeepSpeed's CPU op with the first
    # `ninja` on PATH, and a different ninja discards the cached build.
    env["PATH"] = os.path.dirname(PYTHON) + os.pathsep + env.get("PATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(PYTHON)), "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_forked_ranks(target, world: int, *args, timeout: float = 240, between=None) -> None:
    """Run ``target(rank, *args)`` in ``world`` forked processes (they reuse
    this process's imports) and fail naming the rank that did not exit 0.
    ``between``, if given, runs here while the ranks do."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    if between is not None:
        between()
    for p in procs:
        p.join(timeout=timeout)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0, f"rank {r} failed (exit code {p.exitcode}); its traceback is in the captured stderr"


def run_gloo_ranks(body, world: int, *args, timeout: float = 240) -> list:
    """Run ``body(rank, *args)`` on ``world`` forked ranks, each inside a gloo
    process group of its own job (a free port), one thread each, and return
    what each rank's call returned (tensors, numbers, containers), in rank
    order. Fails naming the rank that raised (its traceback is in the
    captured stderr)."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as out:
        run_forked_ranks(_gloo_rank, world, body, world, free_port(), args, out, timeout=timeout)
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=True) for r in range(world)]


def _gloo_rank(rank: int, body, world: int, port: int, args: tuple, out: str) -> None:
    import traceback

    import torch
    import torch.distributed as dist

    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        torch.save(body(rank, *args), os.path.join(out, f"{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)  # a forked child must not run the parent's pytest teardown


def kill_job(proc, marker: str) -> None:
    """SIGKILL a launcher and every process whose command line holds ``marker``:
    torchrun starts its workers in sessions of their own, so killing the
    launcher's process group alone would leave the ranks running."""
    import signal
    import subprocess

    subprocess.run(["pkill", "-9", "-f", marker])
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class SmallDisk:
    """A real file system of a few MB (tmpfs) where a full disk happens for real."""

    def __init__(self, path, size_mb: int):
        import subprocess

        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        cp = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", self.path],
                            capture_output=True, text=True)
        assert cp.returncode == 0, (f"mounting a {size_mb} MB tmpfs at {self.path} failed ({cp.stderr.strip()}): "
                                    "the full-disk tests need root (CAP_SYS_ADMIN), as the cluster tests do")

    def resize(self, size_mb: int) -> None:
        import subprocess

        subprocess.run(["mount", "-o", f"remount,size={size_mb}m", self.path], check=True)

    def free_bytes(self) -> int:
        import shutil

        return shutil.disk_usage(self.path).free

    def fill(self, leave_bytes: int = 0) -> str:
        """Write a ballast file until only ``leave_bytes`` are free; its path."""
        ballast = os.path.join(self.path, "ballast")
        with open(ballast, "wb") as f:
            f.write(b"\0" * max(0, self.free_bytes() - leave_bytes))
        return ballast

    def unmount(self) -> None:
        import subprocess

        subprocess.run(["umount", "-l", self.path], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """Factory: ``small_disk(size_mb)`` -> a mounted SmallDisk under tmp_path, unmounted afterwards."""
    disks = []

    def make(size_mb: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size_mb))
        return disks[-1]

    yield make
    for d in disks:
        d.unmount()


# Real-cluster fixtures (Slurm, sshd/pdsh, network namespaces, TensorBoard).
from tests.cluster.fixtures import pdsh_hosts, slurm_cluster, tensorboard_server  # noqa: E402,F401


@pytest.fixture(scope="session")
def tokenizer():
    """The default tokenizer (MiniLM's BERT-uncased vocabulary, offline)."""
    from user_dist.config import TextEncoderConfig
    from user_dist.tokenizer import build_tokenizer

    return build_tokenizer(TextEncoderConfig())


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A tiny synthetic set for whole training jobs: 96 train images in 4
    shards (10 steps per epoch at 2 ranks x 24), 40 val, 40 test, 32-d regions."""
    import subprocess

    out = tmp_path_factory.mktemp("tiny_synthetic")
    subprocess.run([PYTHON, "-m", "data_shards", "synthetic", "--out", str(out), "--train-images", "96",
                    "--val-images", "40", "--test-images", "40", "--region-dim", "32", "--shard-size", "24",
                    "--modes", "regions"], check=True, cwd=ROOT, env=child_env(), capture_output=True)
    return out / "shards" / "regions"


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    """The synthetic set in both modes, 17 test images (shards of 5), 32-d regions:
    root/shards/regions/test and root/shards/jpg/test hold the same images."""
    from data_shards.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("small_synthetic")
    build_synthetic(str(out), train_images=2, val_images=2, test_images=17, region_dim=32, shard_size=5)
    return out / "shards"
