"""UTO against a naive float64 reference (values and gradients), and its masks."""
import math

import pytest
import torch
import torch.nn.functional as F

from user_dist.config import LossConfig, QueueConfig
from user_dist.loss import soft_term, uto_loss
from user_dist.queue import NegativeQueues

MU, GAMMA = 90.0, 0.5


def naive_uto(img, txt, img_k, txt_k, ids, q_img, q_txt, q_ids, batch_weight, queue_weight):
    """method.md, one query at a time, negatives listed explicitly."""
    def soft(values):
        return torch.log(1 + sum(torch.exp(MU * (v - GAMMA)) for v in values)) / MU if values else 0.0

    def pos(s):
        return torch.log(1 + torch.clamp(s, min=0))

    B = img.shape[0]
    l_batch = 0.0
    l_queue_i, l_queue_t = 0.0, 0.0
    for i in range(B):
        row = [img[i] @ txt[j] for j in range(B) if ids[j] != ids[i]]
        col = [txt[i] @ img[j] for j in range(B) if ids[j] != ids[i]]
        l_batch = l_batch + soft(row) + soft(col) - pos(img[i] @ txt[i])
        l_queue_i = l_queue_i + soft([img[i] @ q_txt[k] for k in range(len(q_ids)) if q_ids[k] != ids[i]]) \
            - pos(img[i] @ txt_k[i])
        l_queue_t = l_queue_t + soft([txt[i] @ q_img[k] for k in range(len(q_ids)) if q_ids[k] != ids[i]]) \
            - pos(txt[i] @ img_k[i])
    return batch_weight * l_batch / B + queue_weight * (l_queue_i + l_queue_t) / B


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.fixture
def case():
    """6 pairs in 8-d (ids 3 and 5 repeat: two captions of one image), and a
    queue of 10 slots holding 7 entries, two of them of images in the batch."""
    E = 8
    img, txt = _unit(6, E, seed=1), _unit(6, E, seed=2)
    txt = F.normalize(txt + 1.5 * img, dim=-1)  # positives similar, some negatives above gamma
    img_k, txt_k = F.normalize(img + 0.1 * _unit(6, E, seed=3), dim=-1), F.normalize(txt + 0.1 * _unit(6, E, seed=4), dim=-1)
    ids = torch.tensor([3, 1, 3, 4, 5, 5])
    queue = NegativeQueues(QueueConfig(size_per_rank=10), E)
    q_img, q_txt = F.normalize(img[[0, 1, 2, 3, 4, 5, 0]] + 0.3 * _unit(7, E, seed=5), dim=-1), \
        F.normalize(txt[[5, 4, 3, 2, 1, 0, 1]] + 0.3 * _unit(7, E, seed=6), dim=-1)
    q_ids = torch.tensor([10, 11, 4, 12, 13, 1, 14])
    queue.enqueue(q_img.float(), q_txt.float(), q_ids)
    return img, txt, img_k, txt_k, ids, queue, (q_img, q_txt, q_ids)


@pytest.mark.parametrize("batch_weight,queue_weight", [(1.0, 1.0), (20.0, 0.5)])
def test_uto_matches_the_naive_float64_reference(case, batch_weight, queue_weight):
    img, txt, img_k, txt_k, ids, queue, (q_img, q_txt, q_ids) = case
    cfg = LossConfig(mu=MU, gamma=GAMMA, batch_weight=batch_weight, queue_weight=queue_weight)
    a = [t.float().requires_grad_() for t in (img, txt)]
    b = [t.clone().requires_grad_() for t in (img, txt)]
    loss, stats = uto_loss(a[0], a[1], img_k.float(), txt_k.float(), ids, queue, cfg)
    want = naive_uto(b[0], b[1], img_k, txt_k, ids, q_img.float().double(), q_txt.float().double(), q_ids,
                     batch_weight, queue_weight)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    got_grads = torch.autograd.grad(loss, a)
    want_grads = torch.autograd.grad(want, b)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
    assert stats["active_neg_frac"] > 0  # the case exercises the hinge


def test_captions_of_the_same_image_are_never_negatives(case):
    img, txt, img_k, txt_k, ids, queue, _ = case
    cfg = LossConfig(mu=MU, gamma=GAMMA)
    base, _ = uto_loss(img.float(), txt.float(), img_k.float(), txt_k.float(), ids, queue, cfg)
    # Make the queued text of image 4 (slot 2) identical to image 4's query: it would dominate
    # the soft max as a negative, but it is a caption of the same image.
    queue.text[2] = img[3].float()
    same, _ = uto_loss(img.float(), txt.float(), img_k.float(), txt_k.float(), ids, queue, cfg)
    torch.testing.assert_close(same, base)
    # The same in the batch: sample 2 shares image 3 with sample 0.
    txt2 = txt.clone().float()
    txt2[2] = img[0].float()
    loss_same, _ = uto_loss(img.float(), txt2, img_k.float(), txt_k.float(), ids, None, cfg)
    ids_distinct = torch.tensor([3, 1, 7, 4, 5, 6])
    loss_distinct, _ = uto_loss(img.float(), txt2, img_k.float(), txt_k.float(), ids_distinct, None, cfg)
    assert loss_distinct > loss_same + 0.1  # counted as a negative only when the ids differ


def test_empty_queue_slots_are_not_negatives(case):
    img, txt, img_k, txt_k, ids, queue, _ = case
    cfg = LossConfig(mu=MU, gamma=GAMMA)
    base, _ = uto_loss(img.float(), txt.float(), img_k.float(), txt_k.float(), ids, queue, cfg)
    queue.image[7:] = img[0].float()  # slots 7..9 were never written
    queue.text[7:] = img[0].float()
    again, stats = uto_loss(img.float(), txt.float(), img_k.float(), txt_k.float(), ids, queue, cfg)
    torch.testing.assert_close(again, base)
    assert stats["queue_fill"] == pytest.approx(0.7)


def test_slots_a_skipped_step_left_empty_are_not_negatives(case):
    """A skipped step (enqueue keep=False) advances the ring over slots that
    keep id -1: inside the filled prefix, never counted, whatever they hold."""
    img, txt, img_k, txt_k, ids, queue, _ = case
    cfg = LossConfig(mu=MU, gamma=GAMMA)
    base, _ = uto_loss(img.float(), txt.float(), img_k.float(), txt_k.float(), ids, queue, cfg)
    queue.enqueue(img[:2].float(), txt[:2].float(), torch.tensor([20, 21]), keep=torch.tensor(False))
    assert queue.fill == 9 and queue.ids[7:9].tolist() == [-1, -1]
    queue.image[7:9] = img[0].float()  # would dominate the soft max if counted
    queue.text[7:9] = img[0].float()
    again, _ = uto_loss(img.float(), txt.float(), img_k.float(), txt_k.float(), ids, queue, cfg)
    torch.testing.assert_close(again, base)


def test_soft_term_of_no_negatives_is_zero_and_matches_log1p_sum_exp():
    sims = torch.tensor([[0.9, 0.2, 0.6]])
    assert soft_term(sims, torch.zeros_like(sims, dtype=torch.bool), MU, GAMMA).item() == 0.0
    want = math.log(1 + math.exp(MU * 0.4) + math.exp(MU * -0.3) + math.exp(MU * 0.1)) / MU
    assert soft_term(sims, torch.ones_like(sims, dtype=torch.bool), MU, GAMMA).item() == pytest.approx(want, rel=1e-6)


def test_bf16_embeddings_give_an_fp32_loss_equal_to_the_fp32_computation(case):
    img, txt, img_k, txt_k, ids, queue, _ = case
    cfg = LossConfig(mu=MU, gamma=GAMMA)
    low = [t.to(torch.bfloat16) for t in (img, txt)]
    loss, _ = uto_loss(low[0], low[1], img_k.float(), txt_k.float(), ids, queue, cfg)
    ref, _ = uto_loss(low[0].float(), low[1].float(), img_k.float(), txt_k.float(), ids, queue, cfg)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)


def test_stats_are_detached_scalar_tensors(case):
    img, txt, img_k, txt_k, ids, queue, _ = case
    _, stats = uto_loss(img.float().requires_grad_(), txt.float(), img_k.float(), txt_k.float(), ids, queue,
                        LossConfig())
    assert set(stats) == {"loss_batch", "loss_queue", "pos_sim", "hardest_neg", "active_neg_frac", "queue_fill"}
    for value in stats.values():
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad
    torch.testing.assert_close(stats["pos_sim"], (img * txt).sum(-1).mean().float())


@pytest.mark.slow
def test_the_compiled_loss_equals_the_eager_one_and_the_reference(case):
    """train.compile's loss (inductor on the CPU here): same value, statistics
    and gradients as eager and as the naive float64 reference, with a queue
    whose empty slots (id -1) it reads and masks."""
    from user_dist.loss import compiled_uto_terms

    img, txt, img_k, txt_k, ids, queue, (q_img, q_txt, q_ids) = case
    cfg = LossConfig(mu=MU, gamma=GAMMA, batch_weight=1.0, queue_weight=1.0)
    terms = compiled_uto_terms("default")
    got = {}
    for name, kw in (("eager", {}), ("compiled", {"terms": terms})):
        a = [t.float().requires_grad_() for t in (img, txt)]
        loss, stats = uto_loss(a[0], a[1], img_k.float(), txt_k.float(), ids, queue, cfg, **kw)
        got[name] = (loss, stats, torch.autograd.grad(loss, a))
    b = [t.clone().requires_grad_() for t in (img, txt)]
    ref = naive_uto(b[0], b[1], img_k, txt_k, ids, q_img.float().double(), q_txt.float().double(), q_ids, 1.0, 1.0)
    ref_grads = torch.autograd.grad(ref, b)
    (le, se, ge), (lc, sc, gc) = got["eager"], got["compiled"]
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lc.double(), ref, rtol=1e-5, atol=1e-6)
    assert se.keys() == sc.keys()
    for k in se:
        torch.testing.assert_close(sc[k], se[k], rtol=1e-5, atol=1e-6, equal_nan=True)
    for g_c, g_e, g_r in zip(gc, ge, ref_grads):
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_c.double(), g_r, rtol=1e-4, atol=1e-5)
