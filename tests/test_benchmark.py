"""launch/benchmark.py: the training-step table (smoke test, not timed) and the
bytes two gloo ranks communicate per step against the formula.

One run of the script (its train and dist sections) with a small model serves
every test: starting DeepSpeed processes dominates the cost.
"""
import json
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT, child_env

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
def test_train_table_has_every_column_and_the_step_breakdown(run):
    stdout, _ = run
    assert "| ms/step | samples/s | peak mem GB | TFLOP/s | MFU |" in stdout
    for phase in ("forward (online towers)", "momentum encode", "loss (UTO)", "backward (+ grad all-reduce)",
                  "optimiser step", "momentum update", "enqueue keys", "communication"):
        assert f"| {phase}" in stdout or f"| ({phase}" in stdout, phase
    assert "not meaningful on a CPU" in stdout


@pytest.mark.slow
def test_train_figures_are_consistent(run):
    _, results = run
    r = results["train"]
    assert r["ms_per_step"] > 0 and r["peak_memory_gb"] > 0
    assert r["samples_per_s"] == pytest.approx(BATCH / (r["ms_per_step"] / 1e3))
    assert r["tflops"] == pytest.approx(r["gflop_per_sample"] * r["samples_per_s"] / 1e3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_two_ranks_communicate_exactly_the_formula_bytes(run, mode):
    r = run[1]["dist"][mode]
    assert sum(r["bytes_per_step"].values()) == sum(r["formula"].values())


@pytest.mark.slow
def test_sharded_mode_sends_keys_to_their_owners_and_adds_only_per_query_statistics(run):
    """Sharded vs replicated, whatever the pool size: + the max all-reduce
    (2 W B floats), the sums/active/count all-reduce (6 W B) and its backward
    (6 W B), 56 W B bytes; - the keys: each rank sends its own B keys (image +
    text fp32, id int64) to their slots' owners instead of gathering all W B."""
    d = run[1]["dist"]
    key_bytes = 2 * EMBED * 4 + 8
    assert d["replicated"]["bytes_per_step"]["enqueue keys: all_gather"] == WORLD * BATCH * key_bytes
    assert d["sharded"]["bytes_per_step"]["enqueue keys: all_to_all_single"] == BATCH * key_bytes
    assert not any(k.startswith("enqueue keys") and "all_gather" in k for k in d["sharded"]["bytes_per_step"])
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
