"""The reference-exact mode (configs/coco_reference.yaml): every departure from
the authors' code switched back, and a training step's loss equal to the
authors' UTO written out in float64."""
import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import ROOT, run_gloo_ranks
from dist_scripts.tiny_setup import make_batch
from user_dist.config import LossConfig, QueueConfig, TextEncoderConfig, load_config
from user_dist.loss import uto_loss
from user_dist.models import build_model
from user_dist.momentum import MomentumTowers
from user_dist.queue import RANDOM_ID, NegativeQueues
from user_dist.tokenizer import CaptionEncoder, build_tokenizer

REFERENCE = os.path.join(ROOT, "configs", "coco_reference.yaml")
# The reference config at test sizes (random init, pool of 64, batch 8 on one process), with gamma
# lowered: a random-init model's similarities (about -0.2..0.2) would never reach the hinge at 0.5.
TINY = ["loss.gamma=0.0", "model.embed_size=32", "model.region_dim=16", "model.mlp_hidden=16", "model.gpo_pe_dim=8",
        "model.gpo_hidden=8", "model.text.pretrained_path=''", "model.text.hidden_size=32",
        "model.text.num_layers=2", "model.text.num_heads=2", "model.text.intermediate_size=64",
        "model.text.max_position=64", "queue.size_per_rank=64", "queue.global_size=0",
        "train.batch_size=8", "train.global_batch_size=0"]


def reference_uto(img, txt, img_k, txt_k, q_img, q_txt, mu=90.0, gamma=0.5, lam=1.0, ids=None, q_ids=None):
    """method.md's UTO as the authors' code computes it, in float64: every
    other pair of the batch and every queue entry is a negative. With ``ids``
    and ``q_ids`` (our default, loss.mask_same_image), pairs and entries of
    the query's own image are left out."""
    img, txt, img_k, txt_k, q_img, q_txt = (t.double() for t in (img, txt, img_k, txt_k, q_img, q_txt))

    def soft(x):  # (1/mu) log(1 + sum_j exp(mu (x_j - gamma)))
        return torch.log(1 + torch.exp(mu * (x - gamma)).sum()) / mu

    def pos(s):  # log(1 + max(0, s))
        return torch.log(1 + torch.clamp(s, min=0))

    B = img.shape[0]
    s = img @ txt.T  # (B, B)
    l_batch, l_queue_img, l_queue_txt = 0.0, 0.0, 0.0
    for i in range(B):
        others = [j for j in range(B) if j != i and (ids is None or ids[j] != ids[i])]
        l_batch = l_batch + soft(s[i, others]) + soft(s[others, i]) - pos(s[i, i])
        negs = [k for k in range(q_img.shape[0]) if q_ids is None or q_ids[k] != ids[i]]
        l_queue_img = l_queue_img + soft(q_txt[negs] @ img[i]) - pos(img[i] @ txt_k[i])
        l_queue_txt = l_queue_txt + soft(q_img[negs] @ txt[i]) - pos(txt[i] @ img_k[i])
    return lam * l_batch / B + l_queue_img / B + l_queue_txt / B


WORLD, B, E, SPR = 2, 3, 8, 8


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def global_steps():
    """Two steps of 2 x 3 pairs, positives close. Step 1: image 1 on both ranks,
    image 2 twice on rank 0; step 2 repeats images 1 and 3 of step 1 (in the
    queue by then). A repeated image's query lies close to its earlier one."""
    out, seen = [], {}
    for step, ids in enumerate(([1, 2, 3, 2, 1, 4], [5, 1, 6, 7, 3, 8])):
        img = _unit(6, E, seed=10 * step)
        for k, i in enumerate(ids):
            if i in seen:
                img[k] = F.normalize(seen[i] + 0.2 * _unit(E, seed=100 + 10 * step + k), dim=-1)
            seen.setdefault(i, img[k])
        txt = F.normalize(img + 0.4 * _unit(6, E, seed=10 * step + 1), dim=-1)
        img_k = F.normalize(img + 0.1 * _unit(6, E, seed=10 * step + 2), dim=-1)
        txt_k = F.normalize(txt + 0.1 * _unit(6, E, seed=10 * step + 3), dim=-1)
        out.append((img, txt, img_k, txt_k, torch.tensor(ids)))
    return out


def test_the_reference_config_switches_every_departure_to_the_authors_behaviour():
    cfg = load_config(REFERENCE)
    assert cfg.loss.mask_same_image is False
    assert cfg.queue.init == "random"
    assert cfg.queue.key_train_mode is True
    assert cfg.model.gse.paper_batchnorm is True and cfg.model.gse.paper_regions == 36
    assert cfg.data.max_text_len == 0
    assert (cfg.train.global_batch_size, cfg.queue.global_size) == (128, 4096)
    ours = load_config(os.path.join(ROOT, "configs", "coco_region.yaml"))
    assert (ours.loss.mask_same_image, ours.queue.init, ours.queue.key_train_mode,
            ours.model.gse.paper_batchnorm) == (True, "empty", False, False) and ours.data.max_text_len > 0


def _step_batch(seed, ids):
    """A regions batch of 36 slots (the paper BatchNorm's count); its first
    pair repeated at every later index whose id repeats the first id: the same
    image with the same caption."""
    b = make_batch(seed, len(ids), R=36, ids=ids)
    for k in range(1, len(ids)):
        if ids[k] == ids[0]:
            for key in ("regions", "region_mask", "input_ids", "attention_mask"):
                b[key][k] = b[key][0]
    return b


@pytest.fixture(scope="module")
def reference_steps():
    """Two steps of the tiny model in the reference config: embeddings, keys and
    the loss both ways; between them the first step's keys are enqueued."""
    cfg = load_config(REFERENCE, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, "regions").train()
    keys = MomentumTowers(model, cfg.queue)
    queue = NegativeQueues(cfg.queue, cfg.model.embed_size)
    start = (queue.image.clone(), queue.text.clone(), queue.ids.clone())
    steps = []
    # Step 2 repeats image ids of step 1: those keys sit in the queue when step 2 runs.
    for seed, ids in ((1, [7, 3, 7, 5, 7, 9, 2, 4]), (2, [3, 11, 3, 12, 13, 7, 14, 15])):
        batch = _step_batch(seed, ids)
        img, txt = (t.detach() for t in model(batch))
        img_k, txt_k = keys.encode(batch)
        q = (queue.image.clone(), queue.text.clone(), queue.ids.clone())
        losses = {}
        for mask in (False, True):
            leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
            loss, _ = uto_loss(*leaves, img_k, txt_k, batch["image_ids"], queue,
                               dataclasses.replace(cfg.loss, mask_same_image=mask))
            losses[mask] = (loss, torch.autograd.grad(loss, leaves))
        steps.append(dict(img=img, txt=txt, img_k=img_k, txt_k=txt_k, ids=batch["image_ids"], queue=q,
                          losses=losses))
        queue.enqueue(img_k, txt_k, batch["image_ids"])
    return cfg, start, steps, model, keys


def test_the_reference_config_builds_the_per_slot_norm_and_train_mode_keys(reference_steps):
    *_, model, keys = reference_steps
    assert model.image_tower.sge.paper_regions == 36
    assert keys.train_mode and keys.module.image_tower.training and keys.module.text_tower.training


def test_the_queue_starts_as_the_reference_does_full_of_random_unit_vectors(reference_steps):
    cfg, (image, text, ids), *_ = reference_steps
    assert image.shape == text.shape == (64, 32)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(64))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(64))
    assert (ids == RANDOM_ID).all()
    assert (image @ text.T).abs().max() < 0.9  # two modalities, independent vectors


@pytest.mark.parametrize("step", [0, 1])
def test_a_step_in_reference_mode_equals_the_authors_loss_in_float64(reference_steps, step):
    """Queue of the authors' code: every entry a negative (random ones at step 1;
    at step 2, step 1's keys too, some of them of the batch's own images)."""
    cfg, _, steps, *_ = reference_steps
    s = steps[step]
    loss, grads = s["losses"][False]
    leaves = [s["img"].double().requires_grad_(), s["txt"].double().requires_grad_()]
    want = reference_uto(*leaves, s["img_k"], s["txt_k"], s["queue"][0], s["queue"][1], cfg.loss.mu,
                         cfg.loss.gamma, cfg.loss.batch_weight)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)


def test_the_model_step_with_masking_on_equals_our_default_reference(reference_steps):
    """The same embeddings with loss.mask_same_image on: the pairs and queued keys
    of the query's own image are left out (the duplicates' effect is shown on
    controlled embeddings below: a random-init model's are not hard enough)."""
    cfg, _, steps, *_ = reference_steps
    for s in steps:
        masked = reference_uto(s["img"], s["txt"], s["img_k"], s["txt_k"], s["queue"][0], s["queue"][1], cfg.loss.mu,
                               cfg.loss.gamma, cfg.loss.batch_weight, ids=s["ids"].tolist(),
                               q_ids=s["queue"][2].tolist())
        torch.testing.assert_close(s["losses"][True][0].double(), masked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [0, 1])
@pytest.mark.parametrize("mask", [False, True])
def test_captions_of_the_same_image_are_negatives_only_with_masking_off(step, mask):
    """Step 1 repeats images 1 and 2 in the batch, step 2 has images 1 and 3 of
    step 1's keys in the queue, all close to their queries: counted as negatives
    (the authors' code) they raise the loss; masked (our default) they do not."""
    steps = global_steps()
    queue = NegativeQueues(QueueConfig(size_per_rank=16, init="random"), E)
    q_img, q_txt, q_ids = queue.image.double(), queue.text.double(), queue.ids.tolist()
    for _, _, img_k, txt_k, ids in steps[:step]:  # the earlier steps' keys, written from slot 0
        queue.enqueue(img_k, txt_k, ids)
        q_img, q_txt = torch.cat([img_k.double(), q_img[6:]]), torch.cat([txt_k.double(), q_txt[6:]])
        q_ids = ids.tolist() + q_ids[6:]
    img, txt, img_k, txt_k, ids = steps[step]
    leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
    loss, _ = uto_loss(*leaves, img_k, txt_k, ids, queue, LossConfig(mask_same_image=mask))
    ref_leaves = [img.double().requires_grad_(), txt.double().requires_grad_()]
    masks = dict(ids=ids.tolist(), q_ids=q_ids) if mask else {}
    want = reference_uto(*ref_leaves, img_k, txt_k, q_img, q_txt, **masks)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(want, ref_leaves)):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)
    # What the duplicates weigh: in the batch at step 1, in the queue only at step 2.
    authors = reference_uto(img, txt, img_k, txt_k, q_img, q_txt)
    masked = reference_uto(img, txt, img_k, txt_k, q_img, q_txt, ids=ids.tolist(), q_ids=q_ids)
    assert authors - masked > 0.05


def test_random_slots_are_filled_slots_and_negatives():
    """id -2 is a filled slot: a random vector that equals a query is its hardest negative."""
    queue = NegativeQueues(QueueConfig(size_per_rank=4, init="random"), E)
    assert (queue.fill, queue.ptr) == (4, 0) and queue.entries()[2].tolist() == [RANDOM_ID] * 4
    img = F.normalize(torch.randn(2, E, generator=torch.Generator().manual_seed(0)), dim=-1)
    cfg = LossConfig(batch_weight=0.0)
    base, _ = uto_loss(img, img, img, img, torch.tensor([0, 1]), queue, cfg)
    queue.text[3] = img[0]  # the negative of image queries is the text queue
    hard, stats = uto_loss(img, img, img, img, torch.tensor([0, 1]), queue, cfg)
    assert hard > base + 0.1 and stats["queue_fill"] == 1.0


def test_a_skipped_step_leaves_the_random_slots_as_they_were():
    queue = NegativeQueues(QueueConfig(size_per_rank=6, init="random"), 4)
    before = [t.clone() for t in (queue.image, queue.text, queue.ids)]
    queue.enqueue(torch.full((2, 4), float("nan")), torch.full((2, 4), float("nan")), torch.tensor([1, 2]),
                  keep=torch.tensor(False))
    assert (queue.ptr, queue.fill) == (2, 6)
    for a, b in zip((queue.image, queue.text, queue.ids), before):
        assert torch.equal(a, b)
    queue.enqueue(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([1, 2]))  # the next step overwrites 2, 3
    assert queue.ids.tolist() == [RANDOM_ID, RANDOM_ID, 1, 2, RANDOM_ID, RANDOM_ID]


def test_the_random_pool_depends_only_on_the_slot():
    """Any layout of the same global pool holds the same vectors: a second queue,
    a larger pool's prefix, a sharded rank's slots (see also the 2-rank test)."""
    a = NegativeQueues(QueueConfig(size_per_rank=1500, init="random"), 8)
    b = NegativeQueues(QueueConfig(size_per_rank=1500, init="random"), 8)
    big = NegativeQueues(QueueConfig(size_per_rank=3000, init="random"), 8)
    assert torch.equal(a.image, b.image) and torch.equal(a.text, b.text)
    assert torch.equal(big.image[:1500], a.image) and torch.equal(big.text[:1500], a.text)
    assert not torch.equal(a.image, a.text)


def test_a_redistributed_random_queue_keeps_random_slots_as_the_oldest():
    """Onto a larger pool: the saved entries, newest last, then the slots left over
    get their random vectors, and the ring overwrites those first."""
    small = NegativeQueues(QueueConfig(size_per_rank=4, init="random"), 4)
    small.enqueue(torch.ones(3, 4), torch.ones(3, 4), torch.tensor([10, 11, 12]))  # slots 0-2; slot 3 random
    large = NegativeQueues(QueueConfig(size_per_rank=6, init="random"), 4)
    fresh = [t.clone() for t in (large.image, large.text)]
    large.redistribute([small.state_dict()])
    assert (large.ptr, large.fill) == (4, 6)
    assert large.ids.tolist() == [RANDOM_ID, 10, 11, 12, RANDOM_ID, RANDOM_ID]  # FIFO: slot 3 was the oldest
    assert torch.equal(large.image[4:], fresh[0][4:]) and torch.equal(large.text[4:], fresh[1][4:])


def test_max_text_len_0_keeps_long_captions_whole_up_to_the_encoders_positions(tokenizer):
    long = " ".join(["a red circle left of a blue square"] * 12)  # 96 words, 98 tokens with [CLS] and [SEP]
    ids, mask = CaptionEncoder(tokenizer, 0).encode([long, "a cat"])
    assert ids.shape == (2, 98) and mask[0].all() and ids[0, -1].item() == tokenizer.sep_token_id
    assert CaptionEncoder(tokenizer, 32).encode([long])[0].shape == (1, 32)  # the default cut
    short = build_tokenizer(TextEncoderConfig(max_position=40))  # a random-init BERT of 40 positions
    ids, mask = CaptionEncoder(short, 0, pad_to_multiple=64).encode([long])
    assert ids.shape == (1, 40) and mask.all() and ids[0, -1].item() == short.sep_token_id
    torch.testing.assert_close(ids[0, 1:39], CaptionEncoder(tokenizer, 0).encode([long])[0][0, 1:39])


# --------------------------------------------------------------------------- 2 gloo ranks

def _rank_main(rank: int) -> dict:
    mine = slice(rank * B, (rank + 1) * B)
    result = {}
    for mode in ("replicated", "sharded"):
        queue = NegativeQueues(QueueConfig(mode=mode, size_per_rank=SPR, init="random"), E)
        slots = [torch.empty(queue.local, 2 * E + 1) for _ in range(WORLD)]
        dist.all_gather(slots, torch.cat([queue.image, queue.text, queue.ids[:, None].float()], 1))
        result[mode, "pool"] = slots  # replicated: every rank's copy; sharded: every rank's own slots
        result[mode, "fill"] = queue.fill
        for step, (img, txt, img_k, txt_k, ids) in enumerate(global_steps()):
            loss, _ = uto_loss(img[mine], txt[mine], img_k[mine], txt_k[mine], ids[mine], queue,
                               LossConfig(mask_same_image=False))
            losses = [torch.empty(()) for _ in range(WORLD)]
            dist.all_gather(losses, loss.detach())
            result[mode, step] = torch.stack(losses)
            queue.enqueue(img_k[mine], txt_k[mine], ids[mine])
    return result


@pytest.fixture(scope="module")
def two_ranks():
    return run_gloo_ranks(_rank_main, WORLD, timeout=120)[0]


def test_the_random_pool_is_the_same_on_every_rank_in_both_modes(two_ranks):
    one = NegativeQueues(QueueConfig(size_per_rank=WORLD * SPR, init="random"), E)  # the same global pool
    whole = torch.cat([one.image, one.text, one.ids[:, None].float()], 1)
    for copy in two_ranks["replicated", "pool"]:
        assert torch.equal(copy, whole)
    assert torch.equal(torch.cat(two_ranks["sharded", "pool"]), whole)  # each rank its own slots
    assert two_ranks["replicated", "fill"] == two_ranks["sharded", "fill"] == WORLD * SPR


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_two_ranks_in_reference_mode_equal_the_authors_loss_over_the_global_batch(two_ranks, mode):
    """Each rank's loss is its own queries' mean: the two averaged are the
    global batch's loss. Both steps, the second with the first's keys queued."""
    one = NegativeQueues(QueueConfig(size_per_rank=WORLD * SPR, init="random"), E)
    q_img, q_txt = one.image.double(), one.text.double()
    for step, (img, txt, img_k, txt_k, ids) in enumerate(global_steps()):
        want = reference_uto(img, txt, img_k, txt_k, q_img, q_txt)
        torch.testing.assert_close(two_ranks[mode, step].double().mean(), want, rtol=1e-5, atol=1e-6)
        q_img, q_txt = torch.cat([img_k.double(), q_img[6:]]), torch.cat([txt_k.double(), q_txt[6:]])


@pytest.mark.slow
def test_the_compiled_loss_in_reference_mode_equals_the_eager_one_and_the_reference():
    """train.compile's loss (inductor on the CPU here) with masking off and a
    random pool, partly overwritten by keys of the batch's own images."""
    from user_dist.loss import compiled_uto_terms

    queue = NegativeQueues(QueueConfig(size_per_rank=16, init="random"), E)
    (img0, _, img_k0, txt_k0, ids0), (img, txt, img_k, txt_k, ids) = global_steps()
    queue.enqueue(img_k0, txt_k0, ids0)
    cfg = LossConfig(mask_same_image=False)
    got = {}
    for name, kw in (("eager", {}), ("compiled", {"terms": compiled_uto_terms("default")})):
        leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
        loss, stats = uto_loss(*leaves, img_k, txt_k, ids, queue, cfg, **kw)
        got[name] = (loss, stats, torch.autograd.grad(loss, leaves))
    want = reference_uto(img, txt, img_k, txt_k, queue.image, queue.text)
    (le, se, ge), (lc, sc, gc) = got["eager"], got["compiled"]
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lc.double(), want, rtol=1e-5, atol=1e-6)
    for k in se:
        torch.testing.assert_close(sc[k], se[k], rtol=1e-5, atol=1e-6, equal_nan=True)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
