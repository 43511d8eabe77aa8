"""launch/benchmark.py: the training-step table and its phases (smoke test,
not timed), the bytes two gloo ranks communicate per step against the bytes
the code declares, and the counter of collectives (launch/bench/comm.py).

One run of the script (its train and dist sections) with a small model serves
the script's tests: starting DeepSpeed processes dominates the cost.
"""
import json
import os
import subprocess
import traceback
import types

import pytest
import torch
import torch.distributed as dist

from conftest import PYTHON, ROOT, child_env, free_port, run_forked_ranks
from launch.bench.comm import NAMESPACES, CommCounter, UnknownCollective, collective_kind
from launch.bench.phases import OTHER
from user_dist.train_step import TrainStep

SMALL = ["model.embed_size=32", "model.region_dim=32", "model.mlp_hidden=16", "model.text.hidden_size=32",
         "model.text.num_layers=1", "model.text.num_heads=2", "model.text.intermediate_size=64",
         "model.text.vocab_size=2000", "queue.size_per_rank=24"]
WORLD, BATCH, SIZE_PER_RANK, EMBED = 2, 8, 24, 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [PYTHON, os.path.join(ROOT, "launch", "benchmark.py"), "--preset", "tiny", "--steps", "2",
           "--warmup", "1", "--batch", str(BATCH), "--breakdown-steps", "1", "--sections", "train,dist",
           "--json", str(out)] + SMALL
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_train_table_has_every_column_and_a_row_per_phase(run):
    stdout, _ = run
    assert "| ms/step | samples/s | peak mem GB | TFLOP/s | MFU |" in stdout
    for phase in TrainStep.PHASES + (OTHER,):
        assert f"| {phase} |" in stdout, phase
    assert "| (communication, inside the phases above" in stdout
    assert "not meaningful on a CPU" in stdout


@pytest.mark.slow
def test_the_breakdown_times_every_phase_of_the_train_step_and_no_other(run):
    """A phase renamed in TrainStep.PHASES but not in micro_step's clock (or
    the reverse) leaves a name without a time, or a time without a name."""
    phases = run[1]["train"]["breakdown"]["phases"]
    assert list(phases) == list(TrainStep.PHASES) + [OTHER]
    assert all(phases[p] > 0 for p in TrainStep.PHASES)


@pytest.mark.slow
def test_train_figures_are_consistent(run):
    _, results = run
    r = results["train"]
    assert r["ms_per_step"] > 0 and r["peak_memory_gb"] > 0
    assert r["samples_per_s"] == pytest.approx(BATCH / (r["ms_per_step"] / 1e3))
    assert r["tflops"] == pytest.approx(r["gflop_per_sample"] * r["samples_per_s"] / 1e3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_two_ranks_communicate_exactly_the_declared_bytes_in_each_phase(run, mode):
    r = run[1]["dist"][mode]
    assert r["bytes_per_step"] == r["formula_by_phase"]
    assert sum(r["bytes_per_step"].values()) == sum(r["formula"].values())


@pytest.mark.slow
def test_sharded_mode_sends_keys_to_their_owners_and_adds_only_per_query_statistics(run):
    """Sharded vs replicated, whatever the pool size: + the max all-reduce
    (2 W B floats), the sums/active/count all-reduce (6 W B) and its backward
    (6 W B), 56 W B bytes; - the keys: each rank sends its own B keys (image +
    text fp32, id int64) to their slots' owners instead of gathering all W B."""
    d = run[1]["dist"]
    key_bytes = 2 * EMBED * 4 + 8
    assert d["replicated"]["bytes_per_step"]["enqueue: all_gather"] == WORLD * BATCH * key_bytes
    assert d["sharded"]["bytes_per_step"]["enqueue: all_to_all"] == BATCH * key_bytes
    assert "enqueue: all_gather" not in d["sharded"]["bytes_per_step"]
    extra = sum(d["sharded"]["bytes_per_step"].values()) - sum(d["replicated"]["bytes_per_step"].values())
    assert extra == 56 * WORLD * BATCH - (WORLD - 1) * BATCH * key_bytes


@pytest.mark.slow
def test_the_pool_doubles_while_sharded_queue_memory_per_rank_stays_constant(run):
    d = run[1]["dist"]
    one_process = 2 * SIZE_PER_RANK * EMBED * 4 + SIZE_PER_RANK * 8  # image + text (fp32) + ids (int64)
    for mode in ("replicated", "sharded"):
        assert d[mode]["pool_size"] == WORLD * SIZE_PER_RANK
        assert d[mode]["queue_bytes_one_process"] == one_process
    assert d["sharded"]["queue_bytes_per_rank"] == one_process
    assert d["replicated"]["queue_bytes_per_rank"] == WORLD * one_process


# ----------------------------------------------------------------------------- the counter of collectives


def _count_every_public_collective(rank: int, port: int) -> None:
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        x = torch.ones(10)  # 40 bytes
        with CommCounter(lambda: "here", torch.device("cpu")) as comm:
            dist.all_reduce(x)
            dist.broadcast(x, 0)
            dist.all_gather([torch.empty(10) for _ in range(WORLD)], x)
            dist.all_gather_single(torch.empty(10 * WORLD), x)
            dist.reduce_scatter_single(torch.empty(10 // WORLD), x)
            dist.all_to_all_single(torch.empty(10), x)
            dist.barrier()
        assert dict(comm.bytes) == {"here: all_reduce": 40, "here: broadcast": 40, "here: all_gather": 2 * 80,
                                    "here: reduce_scatter": 40, "here: all_to_all": 40, "here: barrier": 0}
        assert sum(comm.calls.values()) == 7
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    os._exit(code)


def test_the_counter_sees_every_collective_whatever_function_made_it():
    """Payload: the tensor (all-reduce, broadcast), the gathered result
    (all-gather, old and new API), the input (reduce-scatter, all-to-all)."""
    run_forked_ranks(_count_every_public_collective, WORLD, free_port(), timeout=120)


def test_every_operator_of_the_collective_namespaces_has_a_kind():
    """A collective added to torch (a new c10d operator) must be classified
    before the benchmark counts with that torch."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.split("::")[0] in NAMESPACES]
    assert any(n == "c10d::allreduce_" for n in names)
    for name in names:
        ns, op = name.split("::")
        packet = getattr(getattr(torch.ops, ns), op)
        for overload in packet.overloads():
            collective_kind(getattr(packet, overload))


def test_an_unknown_collective_is_an_error_not_a_silent_zero():
    op = types.SimpleNamespace(_schema=types.SimpleNamespace(name="c10d::frobnicate_"))
    with pytest.raises(UnknownCollective, match="frobnicate_"):
        collective_kind(op)
