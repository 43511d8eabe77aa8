"""launch/evaluate.py: offline scoring of saved matrices, and the run-folder bookkeeping of watch mode.

Checkpoints here are real folders in the run-folder layout (COMPLETE,
config.yaml, model_fp32.pt read with weights_only=True); their "weights" carry
a similarity matrix, which the test's evaluation step scores, so that the
bookkeeping is exercised without the model towers.
"""
import importlib.util
import json
import logging
import os
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, child_env
from user_dist.config import Config, save_config
from user_dist.evaluation.metrics import METRIC_KEYS, evaluate



def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job = load_script("evaluate")


def noisy_sims(n, quality, seed=0):
    """(n, 5n): correct pairs lifted by `quality` over N(0, 1) noise."""
    sims = np.random.default_rng(seed).standard_normal((n, 5 * n), dtype=np.float32)
    sims[np.arange(n).repeat(5), np.arange(5 * n)] += quality
    return sims


# ----------------------------------------------------------------------------- --sims


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), *args],
                          capture_output=True, text=True, env=child_env(), timeout=120)


def test_sims_mode_writes_exactly_the_documented_keys_and_values(tmp_path):
    sims = noisy_sims(1000, 2.0)
    np.save(tmp_path / "a.npy", sims)
    proc = run_cli("--sims", str(tmp_path / "a.npy"), "--protocol", "f30k", "--json", str(tmp_path / "m.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "m.json").read_text())
    assert list(got) == list(METRIC_KEYS)
    assert got == pytest.approx(evaluate(sims, "f30k"))
    assert "f30k" in proc.stdout and "rsum" in proc.stdout  # the terminal table


def test_sims_mode_coco1k_json_holds_the_five_folds(tmp_path):
    sims = np.zeros((5000, 25000), np.float32)
    sims[np.arange(5000).repeat(5), np.arange(25000)] = 1.0
    for f in range(5):  # in fold f, 100 f images have one wrong caption above their own
        sims[1000 * f + np.arange(100 * f), 5000 * f + 5 * np.arange(100 * f) + 5] = 2.0
    np.save(tmp_path / "a.npy", sims)
    assert job.main(["--sims", str(tmp_path / "a.npy"), "--protocol", "coco1k",
                     "--json", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    assert list(got) == [*METRIC_KEYS, "folds"] and len(got["folds"]) == 5
    assert [f["i2t_r1"] for f in got["folds"]] == pytest.approx([100.0, 90.0, 80.0, 70.0, 60.0])
    assert got["i2t_r1"] == pytest.approx(80.0) and got["i2t_meanr"] == pytest.approx(1.2)


def test_several_matrices_are_averaged_before_scoring(tmp_path):
    a, b = noisy_sims(30, 1.0, seed=1), noisy_sims(30, 1.0, seed=2)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    assert job.main(["--sims", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--protocol", "generic",
                     "--json", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    want = evaluate((a.astype(np.float64) + b) / 2, "generic")
    assert got == pytest.approx(want)
    assert got["rsum"] > max(evaluate(a, "generic")["rsum"], evaluate(b, "generic")["rsum"])  # an ensemble helps


@pytest.mark.parametrize("shape,protocol,message", [
    ((1000, 5000), "coco5k", r"shape \(1000, 5000\) does not fit; expected \(5000, 25000\)"),
    ((1000, 5000), "coco1k", r"shape \(1000, 5000\) does not fit; expected \(5000, 25000\)"),
    ((500, 2500), "f30k", r"shape \(500, 2500\) does not fit; expected \(1000, 5000\)"),
    ((10, 40), "generic", r"shape \(10, 40\) does not fit; expected \(N, 5N\)"),
])
def test_a_matrix_of_the_wrong_shape_is_refused(tmp_path, capsys, shape, protocol, message):
    np.save(tmp_path / "a.npy", np.zeros(shape, np.float32))
    assert job.main(["--sims", str(tmp_path / "a.npy"), "--protocol", protocol]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "a.npy") in err
    assert re.search(message, err), err


def test_nan_entries_are_refused(tmp_path, capsys):
    sims = noisy_sims(10, 1.0)
    sims[3, 7] = np.nan
    np.save(tmp_path / "a.npy", sims)
    assert job.main(["--sims", str(tmp_path / "a.npy"), "--protocol", "generic"]) == 2
    assert "NaN" in capsys.readouterr().err


def test_matrices_of_different_shapes_are_refused(tmp_path, capsys):
    np.save(tmp_path / "a.npy", noisy_sims(10, 1.0))
    np.save(tmp_path / "b.npy", noisy_sims(12, 1.0))
    assert job.main(["--sims", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--protocol", "generic"]) == 2
    err = capsys.readouterr().err
    assert "b.npy: shape (12, 60) differs from" in err and "(10, 50)" in err


def test_a_pickled_npy_is_never_unpickled(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    assert job.main(["--sims", str(tmp_path / "a.npy"), "--protocol", "generic"]) == 2
    assert "cannot read a .npy similarity matrix" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run-folder bookkeeping


def write_checkpoint(run, step, sims, *, complete=True, suffix="", corrupt=False):
    """A checkpoint folder as the trainer leaves it (COMPLETE written last)."""
    d = run / "checkpoints" / f"step_{step:08d}{suffix}"
    d.mkdir(parents=True)
    save_config(Config(), str(d / "config.yaml"))
    torch.save({"sims": torch.from_numpy(sims)}, d / "model_fp32.pt")
    if corrupt:
        data = (d / "model_fp32.pt").read_bytes()
        (d / "model_fp32.pt").write_bytes(data[: len(data) // 2])
    if complete:
        (d / "COMPLETE").write_text(json.dumps({"step": step, "epoch": 0}))
    return d


class ScoreSavedSims:
    """The evaluation step of these tests: read the checkpoint for real, score its matrix."""

    def __init__(self):
        self.calls = []

    def __call__(self, ckpt, out_dir):
        step, _, weights = job.read_checkpoint(ckpt)
        self.calls.append(os.path.basename(ckpt))
        return step, {"generic": evaluate(weights["sims"].numpy(), "generic")}


def test_each_complete_checkpoint_is_evaluated_once_in_step_order(tmp_path):
    write_checkpoint(tmp_path, 200, noisy_sims(20, 2.0))
    write_checkpoint(tmp_path, 100, noisy_sims(20, 1.0))
    score = ScoreSavedSims()
    watcher = job.Watcher(str(tmp_path), score)
    assert watcher.poll() == ["step_00000100", "step_00000200"]
    assert watcher.poll() == []
    assert score.calls == ["step_00000100", "step_00000200"]
    metrics = json.loads((tmp_path / "eval" / "step_00000200" / "metrics.json").read_text())
    assert metrics["step"] == 200 and metrics["generic"] == pytest.approx(evaluate(noisy_sims(20, 2.0), "generic"))


def test_a_checkpoint_being_written_is_not_touched_until_it_is_complete(tmp_path):
    write_checkpoint(tmp_path, 100, noisy_sims(20, 1.0), suffix=".tmp")  # COMPLETE inside, not renamed yet
    half = write_checkpoint(tmp_path, 200, noisy_sims(20, 1.0), complete=False)  # no COMPLETE yet
    score = ScoreSavedSims()
    watcher = job.Watcher(str(tmp_path), score)
    assert watcher.poll() == [] and score.calls == []
    (half / "COMPLETE").write_text(json.dumps({"step": 200, "epoch": 0}))
    os.rename(tmp_path / "checkpoints" / "step_00000100.tmp", tmp_path / "checkpoints" / "step_00000100")
    assert watcher.poll() == ["step_00000100", "step_00000200"]


def test_a_corrupt_checkpoint_is_logged_remembered_and_the_watch_goes_on(tmp_path, caplog):
    write_checkpoint(tmp_path, 100, noisy_sims(20, 1.0), corrupt=True)
    write_checkpoint(tmp_path, 200, noisy_sims(20, 1.0))
    score = ScoreSavedSims()
    watcher = job.Watcher(str(tmp_path), score)
    with caplog.at_level(logging.ERROR, logger="user_dist.evaluate"):
        assert watcher.poll() == ["step_00000100", "step_00000200"]
    assert score.calls == ["step_00000200"]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "step_00000100 could not be evaluated and is skipped" in record.getMessage()
    assert "model_fp32.pt" in record.getMessage() or "Error" in record.getMessage()
    state = json.loads((tmp_path / "eval" / "state.json").read_text())
    assert list(state["failed"]) == ["step_00000100"] and list(state["evaluated"]) == ["step_00000200"]
    assert watcher.poll() == []  # not retried on every scan


def test_a_restarted_job_remembers_what_it_did(tmp_path):
    write_checkpoint(tmp_path, 100, noisy_sims(20, 1.0))
    write_checkpoint(tmp_path, 150, noisy_sims(20, 1.0), corrupt=True)
    job.Watcher(str(tmp_path), ScoreSavedSims()).poll()
    write_checkpoint(tmp_path, 200, noisy_sims(20, 1.0))
    score = ScoreSavedSims()
    assert job.Watcher(str(tmp_path), score).poll() == ["step_00000200"]
    assert score.calls == ["step_00000200"]


def test_scalars_go_to_tensorboard_at_the_checkpoint_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_checkpoint(tmp_path, 100, noisy_sims(20, 1.0))
    write_checkpoint(tmp_path, 300, noisy_sims(20, 2.0))
    job.Watcher(str(tmp_path), ScoreSavedSims()).poll()
    acc = EventAccumulator(str(tmp_path / "tb" / "eval"))
    acc.Reload()
    assert {f"eval/generic/{k}" for k in METRIC_KEYS} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("eval/generic/rsum")
    assert [e.step for e in events] == [100, 300]
    assert [e.value for e in events] == pytest.approx(
        [evaluate(noisy_sims(20, q), "generic")["rsum"] for q in (1.0, 2.0)], rel=1e-6)


def test_best_points_at_the_highest_rsum(tmp_path):
    for step, quality in ((100, 0.5), (200, 3.0), (300, 1.5)):
        write_checkpoint(tmp_path, step, noisy_sims(20, quality))
    job.Watcher(str(tmp_path), ScoreSavedSims()).poll()
    best = json.loads((tmp_path / "eval" / "best.json").read_text())
    assert (best["tag"], best["step"], best["protocol"]) == ("step_00000200", 200, "generic")
    assert best["rsum"] == pytest.approx(evaluate(noisy_sims(20, 3.0), "generic")["rsum"])


def test_a_damaged_state_file_stops_the_job_with_what_to_do(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "state.json").write_text("{not json")
    assert job.main(["--run", str(tmp_path)]) == 2
    assert "state.json is not a valid evaluation state file" in capsys.readouterr().err


def test_an_incomplete_checkpoint_is_refused_in_single_checkpoint_mode(tmp_path, capsys):
    d = write_checkpoint(tmp_path, 100, noisy_sims(5, 1.0), complete=False)
    assert job.main(["--checkpoint", str(d)]) == 2
    assert "is not a complete checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- encoding over ranks


ENCODE_WORKER = r"""
import os, sys, torch
torch.set_num_threads(1)
from user_dist import distributed
from user_dist.evaluation.encode import encode_split

class Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt = torch.nn.Linear(6, 4), torch.nn.EmbeddingBag(50, 4)
    def encode_image(self, b):
        return torch.nn.functional.normalize(self.img(b["regions"].mean(1)), dim=-1)
    def encode_text(self, b):
        return torch.nn.functional.normalize(self.txt(b["input_ids"]), dim=-1)

def batch(indices):
    idx = torch.tensor(indices)
    g = torch.Generator().manual_seed(0)
    regions = torch.randn(100, 3, 6, generator=g)[idx]
    ids = (torch.arange(500).view(100, 5, 1) * 7 + torch.arange(4)) % 50
    return {"regions": regions, "input_ids": ids[idx].reshape(-1, 4), "image_index": idx,
            "caption_counts": torch.full((len(idx),), 5)}

n, world = int(sys.argv[2]), distributed.discover().world_size
if world > 1:
    distributed.init_distributed(use_deepspeed=False)
mine = list(range(n))[distributed.rank()::world][::-1]  # this rank's images, out of order
sizes = [3, 1, 4, 2, 5]
batches, i = [], 0
while i < len(mine):
    k = sizes[len(batches) % len(sizes)]
    batches.append(batch(mine[i:i + k])); i += k
split = encode_split(Towers(), batches, torch.device("cpu"))
if distributed.rank() == 0:
    torch.save({"images": split.images, "captions": split.captions, "ids": split.input_ids}, sys.argv[1])
"""


def test_encoding_on_two_ranks_gives_the_single_process_result_in_split_order(tmp_path, port, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(ENCODE_WORKER)
    n = 23
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "two.pt"), str(n)],
                              env=child_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "one.pt"), str(n)])
    runpy.run_path(str(script), run_name="__main__")  # the same split in this single process
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    assert two["images"].shape == (n, 4) and two["captions"].shape == (5 * n, 4)
    for key in one:
        torch.testing.assert_close(two[key], one[key])
    # split order: caption row 5k+c holds image k's caption c (token ids 7*(5k+c) + 0..3, mod 50)
    assert two["ids"][:, 0].tolist() == [(7 * j) % 50 for j in range(5 * n)]


# ----------------------------------------------------------------------------- end to end on synthetic shards


TINY = ["model.embed_size=32", "model.region_dim=32", "model.mlp_hidden=16", "model.gpo_pe_dim=8",
        "model.gpo_hidden=8", "model.text.hidden_size=32", "model.text.num_layers=1", "model.text.num_heads=2",
        "model.text.intermediate_size=64", "data.num_workers=0", "eval.protocols=[generic]", "eval.batch_size=6"]


@pytest.fixture(scope="module")
def test_shards(tmp_path_factory):
    from data_shards.synthetic import build_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    build_synthetic(str(out), train_images=2, val_images=2, test_images=17, region_dim=32, shard_size=5,
                    modes=("regions",))
    return str(out / "shards" / "regions" / "test")


def model_checkpoint(run, step, overrides, drop_key=False):
    """A checkpoint of a random-init tiny model, as the trainer writes it; returns (folder, cfg, model)."""
    from user_dist.config import load_config
    from user_dist.models import build_model

    cfg = load_config(None, TINY + overrides)
    torch.manual_seed(step)
    model = build_model(cfg.model, cfg.data.mode).eval()
    state = model.state_dict()
    if drop_key:
        state.pop(next(iter(state)))
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    save_config(cfg, str(d / "config.yaml"))
    torch.save(state, d / "model_fp32.pt")
    (d / "COMPLETE").write_text(json.dumps({"step": step, "epoch": 1}))
    return d, cfg, model


def test_a_run_is_evaluated_end_to_end_from_its_shards(tmp_path, test_shards):
    from user_dist.data import eval_loader
    from user_dist.tokenizer import build_tokenizer

    _, cfg, model = model_checkpoint(tmp_path, 100, [f"data.test_shards={test_shards}", "eval.save_sims=true"])
    assert job.main(["--run", str(tmp_path)]) == 0
    out = tmp_path / "eval" / "step_00000100"
    sims = np.load(out / "sims.npy")
    assert sims.shape == (17, 85)
    # independent: the whole split as one batch through the towers, straight
    tokenizer = build_tokenizer(cfg.model.text)
    [batch] = list(eval_loader(test_shards, cfg.data, tokenizer, 17))
    with torch.no_grad():
        want = model.encode_image(batch) @ model.encode_text(batch).T
    np.testing.assert_allclose(sims, want.numpy(), atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 100 and metrics["generic"] == pytest.approx(evaluate(sims, "generic"))
    page = (out / "report.html").read_text()
    first_caption = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert first_caption and first_caption in page
    assert json.loads((tmp_path / "eval" / "best.json").read_text())["tag"] == "step_00000100"


def test_a_checkpoint_is_scored_as_a_tensor_where_it_was_computed_and_saved_once(tmp_path, test_shards,
                                                                                    monkeypatch):
    from user_dist.distributed import device_for

    scored = []

    def spy(sims, protocol, source, caption_counts):
        scored.append((torch.is_tensor(sims), sims.device.type, protocol, caption_counts.tolist()))
        return evaluate(sims, protocol, source, caption_counts)

    monkeypatch.setattr(job, "evaluate", spy)
    model_checkpoint(tmp_path, 100, [f"data.test_shards={test_shards}", "eval.save_sims=true"])
    assert job.main(["--run", str(tmp_path)]) == 0
    assert scored == [(True, device_for(0).type, "generic", [5] * 17)]  # the job's device: CUDA where there is one
    out = tmp_path / "eval" / "step_00000100"
    sims = np.load(out / "sims.npy")
    assert sims.dtype == np.float32 and sims.shape == (17, 85)
    # the device's ranks, as the host's numpy path computes them from the saved matrix
    assert json.loads((out / "metrics.json").read_text())["generic"] == evaluate(sims, "generic")


def test_weights_that_do_not_fit_the_model_are_skipped_and_the_run_goes_on(tmp_path, test_shards, caplog):
    model_checkpoint(tmp_path, 100, [f"data.test_shards={test_shards}"], drop_key=True)
    model_checkpoint(tmp_path, 200, [f"data.test_shards={test_shards}"])
    with caplog.at_level(logging.ERROR, logger="user_dist.evaluate"):
        assert job.main(["--run", str(tmp_path)]) == 0
    state = json.loads((tmp_path / "eval" / "state.json").read_text())
    assert list(state["failed"]) == ["step_00000100"] and "Missing key" in state["failed"]["step_00000100"]
    assert list(state["evaluated"]) == ["step_00000200"]


def test_a_split_that_does_not_fit_the_protocol_stops_the_job(tmp_path, test_shards, capsys):
    model_checkpoint(tmp_path, 100, [f"data.test_shards={test_shards}"])
    assert job.main(["--run", str(tmp_path), "eval.protocols=[f30k]"]) == 2
    assert "shape (17, 85) does not fit; expected (1000, 5000)" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "state.json").exists()  # nothing recorded: fix the protocol and rerun


def test_a_checkpoint_outside_a_run_folder_writes_where_told(tmp_path, test_shards):
    d, _, _ = model_checkpoint(tmp_path / "elsewhere", 300, [f"data.test_shards={test_shards}"])
    moved = tmp_path / "step_00000300"
    os.rename(d, moved)
    assert job.main(["--checkpoint", str(moved), "--out", str(tmp_path / "res")]) == 0
    assert json.loads((tmp_path / "res" / "metrics.json").read_text())["step"] == 300
    assert (tmp_path / "res" / "report.html").exists()


# ----------------------------------------------------------------------------- benchmark of the evaluation


def test_the_coco5k_benchmark_times_every_step_and_says_a_small_split_is_scored_generic():
    bench = load_script("bench_eval")
    r = bench.bench_coco5k(bench.TINY, batch=64, text_len=8, device="cpu", n_images=200)
    steps = ("encode_images", "encode_captions", "similarities", "score_coco5k")
    assert all(r[k] > 0 for k in steps)
    assert r["score_coco1k"] is None and "generic" in r["scored_as"] and "5000" in r["scored_as"]
    assert r["total"] == pytest.approx(sum(r[k] for k in steps))
    assert (r["device"], r["n_images"], r["batch"], r["text_len"]) == ("cpu", 200, 64, 8)


def wait_until(done, proc, what, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.2)


def recorded(run, tag):
    """True once the job has recorded `tag` in its state file (its last write for a checkpoint)."""
    path = run / "eval" / "state.json"
    return path.exists() and tag in json.loads(path.read_text())["evaluated"]


@pytest.mark.slow
def test_watch_mode_picks_up_a_checkpoint_written_while_it_runs(tmp_path, test_shards):
    shards = [f"data.test_shards={test_shards}"]
    model_checkpoint(tmp_path, 100, shards)
    d, _, _ = model_checkpoint(tmp_path, 200, shards)
    being_written = tmp_path / "checkpoints" / "step_00000200.tmp"
    os.rename(d, being_written)
    (being_written / "COMPLETE").unlink()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--run", str(tmp_path),
                             "--watch", "--poll", "0.2"], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: recorded(tmp_path, "step_00000100"), proc, "evaluating step 100")
        # nothing done for the checkpoint still being written
        assert sorted(os.listdir(tmp_path / "eval")) == ["best.json", "state.json", "step_00000100"]
        (being_written / "COMPLETE").write_text(json.dumps({"step": 200, "epoch": 2}))  # the trainer's last steps
        os.rename(being_written, tmp_path / "checkpoints" / "step_00000200")
        wait_until(lambda: recorded(tmp_path, "step_00000200"), proc, "evaluating step 200")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    state = json.loads((tmp_path / "eval" / "state.json").read_text())
    assert sorted(state["evaluated"]) == ["step_00000100", "step_00000200"] and not state["failed"]
    assert err.count("evaluated step_00000100") == 1 and err.count("evaluated step_00000200") == 1


def test_the_documented_torchrun_command_takes_a_run_folder(tmp_path):
    """torchrun parses every option before its script's and reads a bare
    ``--run`` as its own ``--run-path``: docs/evaluation.md's command uses
    ``--run-dir``, which must reach the job."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                          os.path.join(ROOT, "launch", "evaluate.py"), "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, env=child_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"nothing pending in {tmp_path}" in out.stdout + out.stderr
    doc = open(os.path.join(ROOT, "docs", "evaluation.md")).read()
    assert "launch/evaluate.py --run-dir runs/NAME --watch" in doc
