"""The momentum (EMA key) towers in evaluation: launch/evaluate.py --towers,
and validation during training ranking checkpoints by them (train.validate_towers).

Checkpoints are real folders as the trainer writes them: model_fp32.pt (the
online towers) and momentum.pt (MomentumTowers.state_dict of a real key copy
moved towards other weights), both read with weights_only=True. The
reference is independent of the job: a fresh model given the key towers'
weights, the whole split in one batch, scored with numpy.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import PYTHON, ROOT, child_env
from test_evaluate_cli import TINY, job, model_checkpoint
from user_dist.config import load_config
from user_dist.evaluation.metrics import evaluate


@pytest.fixture(scope="module")
def shards(small_synthetic):
    return str(small_synthetic / "regions" / "test")


def with_momentum(ckpt, cfg, online):
    """Add momentum.pt to a checkpoint: a real key copy of ``online``, moved half-way to other
    random weights (so it differs from the online towers); returns the key towers' module."""
    from user_dist.models import build_model
    from user_dist.momentum import MomentumTowers

    keys = MomentumTowers(online, cfg.queue)
    keys.momentum = 0.5
    torch.manual_seed(12345)
    keys.update(build_model(cfg.model, cfg.data.mode))
    torch.save(keys.state_dict(), os.path.join(ckpt, "momentum.pt"))
    return keys.module


def split_sims(model, cfg, shards):
    """(N, 5N) scores of the whole split in one batch through ``model``'s towers."""
    from user_dist.data import eval_loader
    from user_dist.tokenizer import build_tokenizer

    [batch] = list(eval_loader(shards, cfg.data, build_tokenizer(cfg.model.text), 1000))  # the whole split
    with torch.no_grad():
        return (model.eval().encode_image(batch) @ model.encode_text(batch).T).numpy()


def reference(module, cfg, shards):
    """The key towers' weights in a fresh model (strict load), scored straight."""
    from user_dist.models import build_model

    fresh = build_model(cfg.model, cfg.data.mode)
    fresh.load_state_dict(module.state_dict())
    return split_sims(fresh, cfg, shards)


def test_momentum_towers_score_exactly_like_a_model_holding_their_weights(tmp_path, shards):
    ckpt, cfg, online = model_checkpoint(tmp_path, 100, [f"data.test_shards={shards}", "eval.save_sims=true"])
    keys = with_momentum(ckpt, cfg, online)
    assert job.main(["--checkpoint", str(ckpt), "--towers", "momentum"]) == 0
    out = tmp_path / "eval" / "step_00000100"
    want = reference(keys, cfg, shards)
    np.testing.assert_allclose(np.load(out / "sims_momentum.npy"), want, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"tag", "step", "momentum"}  # no online results at the top level
    assert metrics["momentum"]["generic"] == evaluate(want, "generic")
    assert metrics["momentum"]["generic"] != evaluate(split_sims(online, cfg, shards), "generic")
    assert json.loads((tmp_path / "eval" / "best.json").read_text())["towers"] == "momentum"


def test_both_sets_are_reported_side_by_side(tmp_path, shards, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt, cfg, online = model_checkpoint(tmp_path, 100, [f"data.test_shards={shards}"])
    keys = with_momentum(ckpt, cfg, online)
    assert job.main(["--checkpoint", str(ckpt), "--towers", "both"]) == 0
    out = tmp_path / "eval" / "step_00000100"
    on, mo = evaluate(split_sims(online, cfg, shards), "generic"), evaluate(reference(keys, cfg, shards), "generic")
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["tag", "step", "generic", "momentum"]  # online where it always was
    assert metrics["generic"] == pytest.approx(on) and metrics["momentum"]["generic"] == pytest.approx(mo)
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in table[2:]}
    assert list(rows) == ["generic (online)", "generic (momentum)"]
    assert float(rows["generic (momentum)"][2 + 6]) == pytest.approx(mo["rsum"], abs=0.005)
    acc = EventAccumulator(str(tmp_path / "tb" / "eval"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "eval/generic/rsum" in tags and "eval/momentum/generic/rsum" in tags
    assert acc.Scalars("eval/momentum/generic/rsum")[0].value == pytest.approx(mo["rsum"])
    page = (out / "report.html").read_text()
    for name in ("online", "momentum"):
        assert f"Image to text: top-5 captions ({name} towers)" in page
        assert f"<td>generic ({name} towers)</td>" in page
    best = json.loads((tmp_path / "eval" / "best.json").read_text())
    assert best["towers"] == "online" and best["rsum"] == pytest.approx(on["rsum"])


def test_online_results_keep_the_layout_they_had_before(tmp_path, shards):
    ckpt, cfg, online = model_checkpoint(tmp_path, 100, [f"data.test_shards={shards}"])
    with_momentum(ckpt, cfg, online)
    assert job.main(["--checkpoint", str(ckpt)]) == 0
    metrics = json.loads((tmp_path / "eval" / "step_00000100" / "metrics.json").read_text())
    assert list(metrics) == ["tag", "step", "generic"]
    assert metrics["generic"] == evaluate(split_sims(online, cfg, shards), "generic")


def test_a_checkpoint_without_momentum_towers_is_skipped_saying_so(tmp_path, shards):
    model_checkpoint(tmp_path, 100, [f"data.test_shards={shards}"])  # no momentum.pt
    assert job.main(["--run", str(tmp_path), "--towers", "momentum"]) == 0
    state = json.loads((tmp_path / "eval" / "state.json").read_text())
    assert "momentum.pt is missing" in state["failed"]["step_00000100"]
    assert "--towers online" in state["failed"]["step_00000100"]


def test_sims_mode_refuses_towers(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.eye(2, 10, dtype=np.float32))
    with pytest.raises(SystemExit):
        job.main(["--sims", str(tmp_path / "a.npy"), "--protocol", "generic", "--towers", "momentum"])
    assert "--sims takes no shards, --towers" in capsys.readouterr().err


# ----------------------------------------------------------------------------- validation during training


@pytest.mark.slow
def test_validation_by_the_momentum_towers_keeps_the_checkpoint_they_score_best(tiny_shards, tmp_path):
    """A real one-process training job (3 epochs, a validation at each end) with
    train.validate_towers=momentum: each logged val/momentum/rsum is the rsum of
    that epoch's saved momentum.pt scored independently, and the best checkpoint
    is the one whose key towers score highest."""
    from user_dist import checkpoint as ckpt
    from user_dist.models import build_model

    overrides = TINY[:9] + [
        f"data.train_shards={tiny_shards / 'train'}", f"data.val_shards={tiny_shards / 'val'}",
        f"data.test_shards={tiny_shards / 'test'}", "data.num_workers=0", "queue.size_per_rank=48",
        "queue.momentum=0.9", "train.batch_size=24", "train.epochs=3", "train.precision=fp32", "train.log_every=1",
        "optim.lr=2e-3", "optim.decay_epochs=[10]", "train.keep_last=3", f"train.run_root={tmp_path}",
        "train.run_name=r", "train.validate_towers=momentum", "eval.batch_size=40"]
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "launch", "train.py"), *overrides], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "r"
    logged = {}
    with open(run / "train_log.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if "val/momentum/rsum" in rec:
                logged[rec["step"]] = rec["val/momentum/rsum"]
            assert "val/rsum" not in rec  # the online towers were not the ones validated
    cfg = load_config(None, overrides)
    scored = {}
    for d in ckpt.list_checkpoints(str(run / "checkpoints")):
        step = ckpt.CheckpointMeta.read(d).step
        model = build_model(cfg.model, cfg.data.mode)
        model.load_state_dict(ckpt.load_momentum_weights(d))
        sims = split_sims(model, cfg, str(tiny_shards / "val"))
        scored[step] = evaluate(sims, "generic")["rsum"]
    assert sorted(logged) == sorted(scored) and len(scored) == 3
    for step in scored:
        assert logged[step] == pytest.approx(scored[step], abs=1e-9)
    best_step = max(scored, key=lambda s: (scored[s], -s))  # the first of equals stays best
    meta = ckpt.CheckpointMeta.read(ckpt.latest_checkpoint(str(run / "checkpoints")))
    assert meta.best_tag == ckpt.tag_for(best_step) and meta.best_rsum == pytest.approx(scored[best_step])
    assert (run / "checkpoints" / "best").read_text().strip() == ckpt.tag_for(best_step)



def test_both_sets_of_towers_keep_their_own_extended_metrics_in_table_tensorboard_and_report(tmp_path):
    """--towers both on COCO 5K with caption ids: each set's ECCV / CxC / PMRP
    figures stay with that set in the terminal table, the TensorBoard tags
    (eval/eccv_* and eval/momentum/eccv_*) and the report."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from user_dist.evaluation import extended
    from user_dist.evaluation.report import TowerScores, render_html

    rng = np.random.default_rng(1)
    sims = {t: rng.standard_normal((6, 30)).astype(np.float32) for t in ("online", "momentum")}
    ext = {t: {k: float(v) for k, v in zip(extended.EXTENDED_KEYS, rng.uniform(0, 100, len(extended.EXTENDED_KEYS)))}
           for t in sims}
    by_towers = {t: {"generic": evaluate(sims[t], "generic"), extended.EXTENDED: ext[t]} for t in sims}
    results = job.towers_results(by_towers)

    table = job.format_results(results)
    for t in sims:
        block = table.split(f"{t} towers\n", 1)[1].split("\n\n", 1)[0]
        assert f"{ext[t]['eccv_i2t_map_at_r']:.2f}" in block.splitlines()[1]
    assert "generic (online)" in table and "generic (momentum)" in table and "extended (" not in table

    recorder = job.RunRecorder(str(tmp_path))
    recorder.record("step_00000010", 10, results)
    acc = EventAccumulator(str(tmp_path / "tb" / "eval"))
    acc.Reload()
    assert acc.Scalars("eval/cxc_t2i_r5")[0].value == pytest.approx(ext["online"]["cxc_t2i_r5"], rel=1e-6)
    assert acc.Scalars("eval/momentum/cxc_t2i_r5")[0].value == pytest.approx(ext["momentum"]["cxc_t2i_r5"], rel=1e-6)
    best = json.loads((tmp_path / "eval" / "best.json").read_text())
    assert (best["towers"], best["protocol"]) == ("online", "generic")

    captions, labels = [f"c{j}" for j in range(30)], [f"i{k}" for k in range(6)]
    page = render_html("t", by_towers["online"], sims["online"], captions, labels, towers="online",
                       more=[TowerScores("momentum", by_towers["momentum"], sims["momentum"], None)])
    for t in sims:
        part = page.split(f"COCO 5K with extended positives ({t} towers)", 1)[1].split("<h2>", 1)[0]
        assert f"<td>ECCV R@1</td><td>{ext[t]['eccv_i2t_r1']:.2f}</td>" in part
