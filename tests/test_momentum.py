"""The fp32 momentum (key) towers: EMA formula, modes, dtype, state."""
import copy

import pytest
import torch

from dist_scripts.tiny_setup import make_batch, tiny_model_cfg
from user_dist.config import QueueConfig
from user_dist.models import build_model
from user_dist.momentum import MomentumTowers


@pytest.fixture(scope="module")
def online():
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(kind="sge", clip_text_guide=False), "regions")


def _perturbed(model, seed):
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(moved.parameters()) + [b for b in moved.buffers() if b.is_floating_point()]:
            t.add_(torch.randn(t.shape, generator=g))
    return moved


def test_update_is_m_key_plus_one_minus_m_online(online):
    towers = MomentumTowers(online, QueueConfig(momentum=0.9))
    before = {k: v.double().clone() for k, v in towers.module.state_dict().items()}
    moved = _perturbed(online, 1)
    towers.update(moved)
    after = towers.module.state_dict()
    for name, p in moved.named_parameters():
        torch.testing.assert_close(after[name].double(), 0.9 * before[name] + 0.1 * p.detach().double())
    # Eval-mode keys: BatchNorm running statistics follow the online ones with the same m.
    name = "image_tower.proj.mlp_norm.running_mean"
    torch.testing.assert_close(after[name].double(), 0.9 * before[name] + 0.1 * dict(moved.named_buffers())[name].double())


def test_key_towers_are_fp32_without_gradients_and_in_eval_mode(online):
    towers = MomentumTowers(online.to(torch.bfloat16), QueueConfig())
    online.float()
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in towers.module.parameters())
    img_k, txt_k = towers.encode(make_batch(1, 3))
    assert img_k.dtype == txt_k.dtype == torch.float32 and not img_k.requires_grad
    assert not any(m.training for m in towers.module.modules())


def test_bf16_online_towers_update_the_fp32_keys(online):
    towers = MomentumTowers(online, QueueConfig(momentum=0.5))
    low = _perturbed(online, 2).to(torch.bfloat16)
    towers.update(low)
    key = dict(towers.module.named_parameters())["text_tower.linear.weight"]
    want = 0.5 * dict(online.named_parameters())["text_tower.linear.weight"] + 0.5 * low.text_tower.linear.weight.float()
    assert key.dtype == torch.float32
    torch.testing.assert_close(key, want)


def test_train_mode_option_keeps_the_keys_own_running_statistics(online):
    towers = MomentumTowers(online, QueueConfig(key_train_mode=True))
    towers.encode(make_batch(2, 4))  # batch statistics update the key towers' running stats
    assert towers.module.training
    stats = towers.module.image_tower.proj.mlp_norm.running_mean.clone()
    towers.update(_perturbed(online, 3))
    torch.testing.assert_close(towers.module.image_tower.proj.mlp_norm.running_mean, stats)


def test_state_dict_round_trip(online):
    towers = MomentumTowers(online, QueueConfig())
    towers.update(_perturbed(online, 4))
    fresh = MomentumTowers(online, QueueConfig())
    fresh.load_state_dict(towers.state_dict())
    for name, value in towers.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value)


def test_the_frozen_online_clip_is_shared_not_copied():
    cfg = tiny_model_cfg(kind="cge", clip_text_guide=False, clip_source="online", clip_model="open_clip:ViT-S-32")
    cfg.gse.clip_dim = 384
    model = build_model(cfg, "regions")
    towers = MomentumTowers(model, QueueConfig())
    assert towers.module.clip is model.clip
    assert not any(k.startswith("clip.") for k in towers.state_dict())
    towers.update(model)  # frozen parameters are not part of the EMA
