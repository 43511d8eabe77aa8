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
