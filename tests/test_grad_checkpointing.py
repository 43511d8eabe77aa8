"""train.grad_checkpointing: every tower that supports it recomputes its
activations in backward (it keeps fewer tensors for backward), and the
gradients equal those of the plain forward, dropout on (the recomputation
replays the forward's RNG state). SGE's BatchNorm running statistics move
once per forward. A tower that cannot checkpoint is refused by name; the
real TrainStep (DeepSpeed engine, one rank) trains the same with it on."""
import copy
import dataclasses
import json

import pytest
import torch

from dist_scripts.tiny_setup import make_batch, tiny_model_cfg
from user_dist.config import ConfigError, GSEConfig, ImageEncoderConfig, load_config
from user_dist.models.image import BackboneTower, RegionTower
from user_dist.models.text import TextTower

# Dropout on in the text encoder and SGE: the recomputation must draw the same masks.
DROPOUT = dict(text_dropout=0.1, sge_dropout=0.4)
# A tiny open_clip ViT (random init), registered under this name for the test.
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}


def model_cfg(backbone: str = "open_clip:ViT-B-32"):
    cfg = tiny_model_cfg(kind="sge")
    return dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, dropout=DROPOUT["text_dropout"]),
        gse=GSEConfig(kind="sge", sge_dropout=DROPOUT["sge_dropout"]),
        image=ImageEncoderConfig(backbone=backbone))


def saved_for_backward_bytes(run) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for
    backward while ``run()`` runs its forward (those a checkpoint drops are
    not among them: it saves through hooks of its own)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


def plain_and_checkpointed(tower: torch.nn.Module, forward):
    """Gradients, saved bytes and outputs of one training forward + backward
    of ``tower`` and of a copy with checkpointing on, both from the same RNG
    state: ``forward(module) -> (B, E)``."""
    twin = copy.deepcopy(tower)
    twin.set_grad_checkpointing(True)
    results = []
    for module in (tower, twin):
        module.train()
        torch.manual_seed(123)
        saved, out = saved_for_backward_bytes(lambda: forward(module))
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append({"grads": grads, "saved": saved, "out": out.detach()})
    return results


def assert_same_gradients(plain, ckpt):
    assert plain["grads"].keys() == ckpt["grads"].keys() and len(plain["grads"]) > 0
    torch.testing.assert_close(ckpt["out"], plain["out"], rtol=1e-6, atol=1e-7)
    for name, g in plain["grads"].items():
        torch.testing.assert_close(ckpt["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("clip_cfg") / "ud-test-tiny-vit.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(path))
    return "ud-test-tiny-vit"


def test_text_tower_checkpoints_its_layers_with_the_same_gradients():
    torch.manual_seed(0)
    tower = TextTower(model_cfg())
    batch = make_batch(1, 4)
    plain, ckpt = plain_and_checkpointed(tower, lambda m: m(batch["input_ids"], batch["attention_mask"]))
    assert_same_gradients(plain, ckpt)
    assert ckpt["saved"] < 0.7 * plain["saved"], (ckpt["saved"], plain["saved"])


def test_region_tower_checkpoints_sge_with_the_same_gradients():
    torch.manual_seed(0)
    cfg = model_cfg()
    # Regions wider than the embedding, as in the paper (2048 -> 1024): SGE
    # on the raw regions holds most of the tower's activations.
    tower = RegionTower(4 * cfg.region_dim, cfg)
    batch = make_batch(2, 5)
    regions = batch["regions"].repeat(1, 1, 4)
    plain, ckpt = plain_and_checkpointed(tower, lambda m: m(regions, batch["region_mask"]))
    assert_same_gradients(plain, ckpt)
    assert ckpt["saved"] < 0.8 * plain["saved"], (ckpt["saved"], plain["saved"])


def test_sge_running_statistics_move_once_per_checkpointed_forward():
    torch.manual_seed(0)
    cfg = model_cfg()
    plain_tower = RegionTower(cfg.region_dim, cfg)
    ckpt_tower = copy.deepcopy(plain_tower)
    ckpt_tower.set_grad_checkpointing(True)
    batch = make_batch(3, 5)
    for tower in (plain_tower, ckpt_tower):
        torch.manual_seed(5)
        tower(batch["regions"], batch["region_mask"]).sum().backward()
    plain_buffers, ckpt_buffers = dict(plain_tower.sge.named_buffers()), dict(ckpt_tower.sge.named_buffers())
    assert int(ckpt_buffers["local_norm.num_batches_tracked"]) == 1
    for name, b in plain_buffers.items():
        torch.testing.assert_close(ckpt_buffers[name], b, msg=name)


@pytest.mark.parametrize("lib", ["open_clip", "timm"])
def test_backbone_tower_checkpoints_its_blocks_with_the_same_gradients(lib, tiny_clip_name):
    backbone = f"open_clip:{tiny_clip_name}" if lib == "open_clip" else "timm:test_vit"
    torch.manual_seed(0)
    tower = BackboneTower(model_cfg(backbone))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    plain, ckpt = plain_and_checkpointed(tower, lambda m: m(images))
    assert_same_gradients(plain, ckpt)
    assert any(n.startswith("backbone.") for n in ckpt["grads"])
    assert ckpt["saved"] < 0.7 * plain["saved"], (ckpt["saved"], plain["saved"])


def test_checkpointing_changes_nothing_without_gradients():
    """Key towers and evaluation (no_grad, or eval mode) run the plain forward."""
    torch.manual_seed(0)
    cfg = model_cfg()
    tower = RegionTower(cfg.region_dim, cfg)
    tower.set_grad_checkpointing(True)
    batch = make_batch(2, 5)
    with torch.no_grad():
        tower(batch["regions"], batch["region_mask"])
    assert int(tower.sge.local_norm.num_batches_tracked) == 1


def test_a_backbone_that_cannot_checkpoint_is_refused_by_name():
    tower = BackboneTower(model_cfg("timm:convit_tiny"))
    with pytest.raises(ConfigError, match="train.grad_checkpointing=true: the timm backbone 'ConVit'"):
        tower.set_grad_checkpointing(True)


def test_the_key_defaults_to_off_and_is_typed():
    assert load_config(None).train.grad_checkpointing is False
    assert load_config(None, ["train.grad_checkpointing=true"]).train.grad_checkpointing is True
    with pytest.raises(ConfigError, match="train.grad_checkpointing"):
        load_config(None, ["train.grad_checkpointing=maybe"])


def _train_two_steps(overrides):
    """Two optimiser steps of the real TrainStep (DeepSpeed engine, key
    towers, queues, UTO) with dropout on: losses, the gradients at each
    optimiser phase, the weights and keys after, and where checkpointing is
    on (online towers, key towers)."""
    from dist_scripts.tiny_setup import STEP_IDS, TRAIN_STEP_OVERRIDES, GradientTap
    from user_dist.train_step import TrainStep

    cfg = load_config(None, TRAIN_STEP_OVERRIDES + [
        f"model.text.dropout={DROPOUT['text_dropout']}", f"model.gse.sge_dropout={DROPOUT['sge_dropout']}",
        "train.batch_size=8", "queue.size_per_rank=16"] + overrides)
    step = TrainStep(cfg, steps_per_epoch=2, total_steps=2)
    step.clock = tap = GradientTap(step)
    losses = []
    for n, ids in enumerate(STEP_IDS[:2]):
        torch.manual_seed(100 + n)  # the dropout masks of this step
        losses.append(step.micro_step(make_batch(n + 1, len(ids), ids=ids), step=n)["loss"].detach().clone())

    def checkpointing(model):
        layers = [m for m in model.text_tower.encoder.modules() if hasattr(m, "gradient_checkpointing")]
        return {"text": any(m.gradient_checkpointing for m in layers), "sge": model.image_tower.sge.checkpointing}

    return {"losses": torch.stack(losses), "grads": tap.grads,
            "params": {n: p.detach().clone() for n, p in step.engine.module.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in step.engine.module.named_buffers()},
            "momentum": step.momentum.state_dict(),
            "online": checkpointing(step.engine.module), "keys": checkpointing(step.momentum.module)}


def _plain_and_checkpointed_steps(rank, overrides):
    """On one gloo rank: _train_two_steps without and with checkpointing."""
    import os

    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed asks for it (a forked rank: not the test's environment)
    return {"plain": _train_two_steps(overrides),
            "ckpt": _train_two_steps(overrides + ["train.grad_checkpointing=true"])}


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["train.zero_stage=0", "train.zero_stage=1"])
def test_train_step_with_checkpointing_trains_like_without(zero):
    from conftest import run_gloo_ranks

    (runs,) = run_gloo_ranks(_plain_and_checkpointed_steps, 1, [zero], timeout=600)
    plain, ckpt = runs["plain"], runs["ckpt"]
    assert ckpt["online"] == {"text": True, "sge": True}
    assert plain["online"] == ckpt["keys"] == plain["keys"] == {"text": False, "sge": False}
    torch.testing.assert_close(ckpt["losses"], plain["losses"], rtol=1e-6, atol=1e-7)
    for step_grads, plain_grads in zip(ckpt["grads"], plain["grads"]):
        for name, g in plain_grads.items():
            torch.testing.assert_close(step_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    for name, p in plain["params"].items():
        torch.testing.assert_close(ckpt["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    for part in ("buffers", "momentum"):  # BatchNorm running statistics moved once per step
        for name, t in plain[part].items():
            torch.testing.assert_close(ckpt[part][name], t, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.long
def test_compiled_towers_checkpoint_and_train_like_without():
    """train.compile=default (inductor on the CPU) with checkpointing: the
    checkpointed regions compile (Dynamo refuses the eager path's
    context_fn, user_dist.models.recompute) and train as without. Dropout
    off: compiled graphs draw their own random numbers, different for
    different graphs, as compiled and eager steps already do."""
    from conftest import run_gloo_ranks

    overrides = ["train.compile=default", "model.text.dropout=0.0", "model.gse.sge_dropout=0.0"]
    (runs,) = run_gloo_ranks(_plain_and_checkpointed_steps, 1, overrides, timeout=600)
    plain, ckpt = runs["plain"], runs["ckpt"]
    assert ckpt["online"] == {"text": True, "sge": True}
    torch.testing.assert_close(ckpt["losses"], plain["losses"], rtol=1e-5, atol=1e-6)
    for step_grads, plain_grads in zip(ckpt["grads"], plain["grads"]):
        for name, g in plain_grads.items():
            torch.testing.assert_close(step_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    for name, b in plain["buffers"].items():  # running statistics moved once per step
        torch.testing.assert_close(ckpt["buffers"][name], b, rtol=1e-5, atol=1e-6, msg=name)


TINY_JPG = ["data.mode=jpg", "data.image_size=32", "model.image.backbone=timm:test_vit", "model.embed_size=32",
            "model.mlp_hidden=16", "model.text.hidden_size=32", "model.text.num_layers=2", "model.text.num_heads=2",
            "model.text.intermediate_size=64", "model.text.vocab_size=2000", "queue.size_per_rank=16"]


@pytest.mark.slow
@pytest.mark.long
def test_memory_benchmark_probes_jpg_steps_and_kills_a_probe_over_the_cap(tmp_path):
    """launch/bench_memory.py: each probe a fresh process running real steps
    (jpg mode here, both variants), and a probe past the cap killed."""
    import subprocess

    from conftest import PYTHON, ROOT, child_env
    from launch.bench.memory import parse_args, probe

    out = tmp_path / "mem.json"
    cmd = [PYTHON, "launch/bench_memory.py", "per-sample", "--preset", "tiny", "--batches", "2,4",
           "--caption-len", "4-6", "--json", str(out)] + TINY_JPG
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["per_sample"]
    assert [r["variant"] for r in rows] == ["plain", "grad_ckpt"]
    for r in rows:
        assert all(p["fits"] and p["rss_peak_gb"] > 0.2 for p in r["probes"]), r
        assert "per_sample_mb" in r
    assert "| grad_ckpt |" in proc.stdout
    args = parse_args(["largest", "--preset", "tiny", "--caption-len", "4-6"] + TINY_JPG)
    miss = probe(args, args.overrides, 2, cap_gb=0.1)  # the interpreter alone passes 0.1 GiB
    assert miss["fits"] is False and miss["error"].startswith("killed"), miss


@pytest.mark.slow
def test_memory_benchmark_probes_whole_accumulation_windows():
    """--micro-batch M: a probe of batch B is B / M micro-batches per
    optimiser step, through cached_step (train.accum_mode=cached) or
    micro_step k times (plain), so the batch searched is the accumulated one."""
    from launch.bench.memory import check_batch, parse_args, probe

    args = parse_args(["largest", "--preset", "tiny", "--caption-len", "4-6", "--micro-batch", "2"] + TINY_JPG)
    for mode in ("cached", "plain"):
        row = probe(args, args.overrides + [f"train.accum_mode={mode}"], 6, cap_gb=0.0)
        assert row["fits"] and "error" not in row, row
        assert (row["batch"], row["micro_batch"], row["grad_accum"], row["accum_mode"]) == (6, 2, 3, mode), row
        assert (row["optimizer_steps"], row["micro_steps"]) == (args.steps, 3 * args.steps), row
    with pytest.raises(SystemExit, match="not a multiple of --micro-batch 2"):
        check_batch(args, 5, "--batches")
