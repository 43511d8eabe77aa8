"""The analytic FLOP count (user_dist.flops) against torch's FlopCounterMode,
which counts every matrix product that actually runs (2 FLOPs per multiply-add)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dist_scripts.tiny_setup import EMBED, make_batch, tiny_model_cfg
from user_dist.config import LossConfig, ModelConfig, QueueConfig
from user_dist.flops import StepShape, count
from user_dist.loss import uto_loss
from user_dist.models import build_model
from user_dist.queue import NegativeQueues

B, R, L, POOL = 4, 6, 9, 12


def counted(fn) -> int:
    """FLOPs torch counts while fn runs. Attention runs on the math backend:
    the CPU flash kernel's FLOPs are not registered with FlopCounterMode."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tiny_model_cfg()  # SGE + CGE on both towers, 2-layer BERT
    model = build_model(cfg, "regions")
    batch = make_batch(1, B, R=R, L=L)
    return cfg, model, batch, count(cfg, StepShape(B, L, R, POOL))


def test_text_tower_forward_matches_the_counted_products(setup):
    cfg, model, batch, flops = setup
    assert counted(lambda: model.encode_text(batch)) == pytest.approx(B * flops.text_fwd, rel=1e-9)


def test_image_tower_forward_matches_the_counted_products(setup):
    cfg, model, batch, flops = setup
    assert counted(lambda: model.encode_image(batch)) == pytest.approx(B * flops.image_fwd, rel=1e-9)


def test_one_bert_layer_is_twelve_h_squared_per_token_plus_attention():
    """A hand count of one BERT layer (the formula everyone uses) and the module's own."""
    cfg = ModelConfig(text=tiny_model_cfg().text)
    cfg.text.num_layers = 1
    H, I = cfg.text.hidden_size, cfg.text.intermediate_size
    parts = count(cfg, StepShape(1, L, R, 0)).parts
    assert parts["text_encoder_dense"].forward == 2 * L * (4 * H * H + 2 * H * I)
    assert parts["text_encoder_attention"].forward == 2 * 2 * L * L * H
    encoder = build_model(cfg, "regions").text_tower.encoder
    ids, mask = torch.randint(1000, 2000, (1, L)), torch.ones(1, L, dtype=torch.long)
    assert counted(lambda: encoder(input_ids=ids, attention_mask=mask)) == (
        parts["text_encoder_dense"].forward + parts["text_encoder_attention"].forward)


def test_training_step_matches_autograd_except_the_gru_initial_state(setup):
    """Forward + backward of the online towers with the UTO loss against a
    queue: equal to exact_train minus the momentum forward, apart from the
    GPO GRUs (whose zero initial state needs no gradient: a few steps less),
    which are compared separately within 10%."""
    cfg, model, batch, flops = setup
    queue = NegativeQueues(QueueConfig(size_per_rank=POOL), EMBED)
    keys = torch.nn.functional.normalize(torch.randn(POOL, EMBED), dim=-1)
    queue.enqueue(keys, keys.flip(0), torch.arange(1000, 1000 + POOL))

    def step():
        img, txt = model(batch)
        loss, _ = uto_loss(img, txt, img.detach(), txt.detach(), batch["image_ids"], queue, LossConfig())
        loss.backward()

    total = counted(step)
    gru_counted = sum(counted(lambda g=gpo, n=n: g.weights_by_length(n).sum().backward())
                      for gpo, n in ((model.image_tower.gpo, R), (model.text_tower.gpo, L)))
    gru_parts = [p for name, p in flops.parts.items() if "gpo_" in name]
    gru_ours = B * sum(p.forward * (1 + p.backward_factor) for p in gru_parts)
    online_exact = B * (flops.exact_train - flops.forward)  # exact_train includes the momentum forward
    assert total - gru_counted == pytest.approx(online_exact - gru_ours, rel=1e-9)
    assert gru_counted == pytest.approx(gru_ours, rel=0.1)


def test_the_convention_is_three_forwards_plus_the_momentum_forward(setup):
    _, _, _, flops = setup
    assert flops.train == pytest.approx(4 * flops.forward + 3 * flops.loss_fwd)
    assert flops.exact_train < flops.train  # raw regions and queue keys need no gradient


def test_paper_preset_gives_the_reference_figure_of_24_45_gflop():
    """BERT-base, 36 x 2048 regions, embed 1024, batch 128, queue 4096, captions
    padded to 32 tokens: /work/shared/gpu/README.md states 24.45 GFLOP/sample."""
    flops = count(ModelConfig(), StepShape(batch=128, text_len=32, regions=36, pool=4096))
    assert flops.train / 1e9 == pytest.approx(24.45, abs=0.01)
