"""UTO, the unified training objective (method.md), distributed.

With s = <v, t> for unit vectors, mu = 90, gamma = 0.5:

    soft(x) = (1/mu) log(1 + sum_j exp(mu (x_j - gamma)))      over negatives j
    pos(s)  = log(1 + max(0, s))
    L_batch = mean_i [soft(s_i,: \\ i) + soft(s_:,i \\ i) - pos(s_ii)]
    L_queue = mean_i [soft(<v_i, text queue>) - pos(<v_i, t'_i>)]
            + mean_i [soft(<t_i, image queue>) - pos(<t_i, v'_i>)]
    L       = batch_weight * L_batch + queue_weight * L_queue

Negatives never include a pair of the same image (image ids), in the batch
or in the queue, unless ``loss.mask_same_image`` is off: then, as in the
authors' code, only the pair itself is excluded from the in-batch negatives
and every filled queue slot is a negative, whatever its id. Empty queue
slots (id -1) are never negatives. The in-batch term runs over the global batch: features are
all-gathered with gradient and each rank computes the loss of its own
queries, so N ranks x B equals one process with N*B (after the engine
averages gradients over ranks). The queue term over a sharded pool is
computed distributed: every rank scores all ranks' queries against its shard,
the max and the sum of exponentials are all-reduced (the sum with gradient,
which carries each rank's share back to the queries' owners).

Everything runs in fp32 with autocast off: mu = 90 amplifies rounding.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from user_dist.config import LossConfig
from user_dist.distributed import all_gather_nograd, all_gather_with_grad, rank, world_size
from user_dist.queue import EMPTY_ID, NegativeQueues


def positive_term(s: torch.Tensor) -> torch.Tensor:
    """pos(s) = log(1 + max(0, s)), elementwise."""
    return torch.log1p(s.clamp(min=0))


def _soft_from(sumexp: torch.Tensor, shift: torch.Tensor, mu: float) -> torch.Tensor:
    """(1/mu) log(1 + sum_j exp(z_j)) from sumexp = sum_j exp(z_j - shift)."""
    return (shift + torch.log(torch.exp(-shift) + sumexp)) / mu


class _SoftParts:
    """The pieces of soft() for rows of similarities (..., Q, K) over valid negatives.

    z = mu (s - gamma); zmax (..., Q) is the max valid logit (-inf if none),
    active / count the number of valid negatives with s > gamma / in total.
    """

    def __init__(self, sims: torch.Tensor, valid: torch.Tensor, mu: float, gamma: float):
        self.mu, self.gamma = mu, gamma
        self.z = (mu * (sims - gamma)).masked_fill(~valid, float("-inf"))  # (..., Q, K)
        self.zmax = (self.z.detach().amax(-1) if self.z.shape[-1]
                     else self.z.new_full(self.z.shape[:-1], float("-inf")))
        self.active = ((sims.detach() > gamma) & valid).sum(-1).float()
        self.count = torch.broadcast_to(valid, self.z.shape).sum(-1).float()

    def sumexp(self, shift: torch.Tensor) -> torch.Tensor:
        """sum_j exp(z_j - shift): (..., Q)."""
        return torch.exp(self.z - shift[..., None]).sum(-1)

    def soft(self) -> torch.Tensor:
        shift = self.zmax.clamp(min=0)  # the "1 +" is exp(0): stabilise at max(0, max z)
        return _soft_from(self.sumexp(shift), shift, self.mu)

    def hardest(self) -> torch.Tensor:
        """Similarity of the hardest valid negative (-inf if none): (..., Q)."""
        return self.zmax / self.mu + self.gamma


def soft_term(sims: torch.Tensor, valid: torch.Tensor, mu: float, gamma: float) -> torch.Tensor:
    """soft() of each row of sims (..., Q, K) over its valid entries: (..., Q).

    No valid entry gives 0 (log 1).
    """
    return _SoftParts(sims, valid, mu, gamma).soft()


def _queue_soft(q_local: torch.Tensor, q_all: Optional[torch.Tensor], q_ids_local: torch.Tensor,
                q_ids_all: torch.Tensor, keys: torch.Tensor, key_ids: torch.Tensor,
                distributed_pool: bool, mu: float, gamma: float,
                mask_same_image: bool = True) -> Tuple[torch.Tensor, ...]:
    """soft() of each local query over the pool, plus statistics.

    q_local (2, B, E): image and text queries of this rank; q_all (2, W*B, E)
    every rank's queries (distributed pool only); keys (2, V, E): text and
    image keys held here (the negatives of image and text queries); key_ids
    (V,), -1 for an empty slot. ``distributed_pool``: a sharded queue over
    more than one rank (collective). ``mask_same_image``: slots of a query's
    own image are not its negatives. Returns soft (2, B), hardest negative
    similarity (2, B), active count (2, B), negative count (2, B).
    """
    queries, q_ids = (q_all, q_ids_all) if distributed_pool else (q_local, q_ids_local)
    valid = key_ids[None, :] != EMPTY_ID  # (1, V): an empty slot (user_dist.queue) is never a negative
    if mask_same_image:
        valid = valid & (q_ids[:, None] != key_ids[None, :])  # (Q, V)
    # (2, Q, V): Q = B, or W*B with a distributed pool (every rank's queries vs this shard)
    sims = torch.einsum("mqe,mve->mqv", queries, keys)
    parts = _SoftParts(sims, valid, mu, gamma)
    if not distributed_pool:
        return parts.soft(), parts.hardest(), parts.active, parts.count
    B = q_local.shape[1]
    zmax = parts.zmax.clone()
    dist.all_reduce(zmax, op=dist.ReduceOp.MAX)  # (2, W*B): global max, a constant shift
    shift = zmax.clamp(min=0)
    # One differentiable all-reduce (its backward sums the gradients over ranks):
    # the sums of exps and the counts. Functional collectives, as torch 2.14
    # asks (torch.distributed.nn.functional is deprecated); waited at once, or
    # its slices would stay AsyncCollectiveTensors.
    stacked = torch.stack([parts.sumexp(shift), parts.active, parts.count])  # (3, 2, W*B)
    summed = funcol.wait_tensor(funcol.all_reduce(stacked, "sum", dist.group.WORLD))
    mine = slice(rank() * B, (rank() + 1) * B)
    soft = _soft_from(summed[0], shift, mu)
    return soft[:, mine], (zmax / mu + gamma)[:, mine], summed[1, :, mine].detach(), summed[2, :, mine].detach()


STAT_NAMES = ("loss_batch", "loss_queue", "pos_sim", "hardest_neg", "active_neg_frac")


def uto_terms(img: torch.Tensor, txt: torch.Tensor, img_all: torch.Tensor, txt_all: torch.Tensor,
              ids: torch.Tensor, ids_all: torch.Tensor, img_k: torch.Tensor, txt_k: torch.Tensor,
              q_image: Optional[torch.Tensor], q_text: Optional[torch.Tensor], q_ids: Optional[torch.Tensor],
              distributed_pool: bool, mu: float, gamma: float, batch_weight: float,
              queue_weight: float, mask_same_image: bool = True, rank: int = 0,
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss from gathered features: fp32 tensors in, no host values read.

    img, txt (B, E) with gradient; img_all, txt_all (W*B, E) every rank's, in
    rank order; ids (B,), ids_all (W*B,); img_k, txt_k (B, E) keys; q_image,
    q_text (V, E), q_ids (V,) the queue slots held here, or None for no queue
    term. ``mask_same_image`` (loss.mask_same_image): pairs of the same image
    id are not negatives; off, only the pair itself, at global row
    rank * B + i, is left out. Returns the loss (scalar) and the detached
    statistics (5,), in STAT_NAMES order. Without a distributed pool it is
    pure tensor code of fixed shapes, which ``compiled_uto_terms`` compiles.
    """
    if mask_same_image:
        neg = ids[:, None] != ids_all[None, :]  # (B, W*B): excludes i itself and same-image pairs
    else:
        pair = torch.arange(ids_all.shape[0], device=ids.device)  # (W*B,) global row of each pair
        B = ids.shape[0]
        neg = pair[rank * B:(rank + 1) * B, None] != pair[None, :]  # (B, W*B): excludes i itself only
    sims = torch.stack([img @ txt_all.T, txt @ img_all.T])  # (2, B, W*B): image->text, text->image
    pos = (img * txt).sum(-1)  # (B,)
    batch_parts = _SoftParts(sims, neg[None].expand_as(sims), mu, gamma)
    loss_batch = (batch_parts.soft().sum(0) - positive_term(pos)).mean()  # soft: (2, B)

    hardest = batch_parts.hardest()  # (2, B)
    active, count = batch_parts.active.sum(), batch_parts.count.sum()
    loss_queue = img.new_zeros(())
    if q_ids is not None:
        keys = torch.stack([q_text, q_image])  # (2, V, E): negatives of image / text queries
        q_soft, q_hard, q_active, q_count = _queue_soft(
            torch.stack([img, txt]), torch.stack([img_all, txt_all]) if distributed_pool else None,
            ids, ids_all, keys, q_ids, distributed_pool, mu, gamma, mask_same_image)
        pos_k = torch.stack([(img * txt_k).sum(-1), (txt * img_k).sum(-1)])  # (2, B)
        loss_queue = (q_soft - positive_term(pos_k)).mean(1).sum()
        hardest = torch.maximum(hardest, q_hard)
        active, count = active + q_active.sum(), count + q_count.sum()
    loss = batch_weight * loss_batch + queue_weight * loss_queue

    hardest = torch.where(torch.isfinite(hardest), hardest, torch.nan).detach()
    stats = torch.stack([loss_batch.detach(), loss_queue.detach(), pos.detach().mean(), hardest.nanmean(),
                         (active / count.clamp(min=1)).detach()])
    return loss, stats


def compiled_uto_terms(mode: str) -> Callable[..., Tuple[torch.Tensor, torch.Tensor]]:
    """``uto_terms`` under torch.compile (train.compile's mode), for pools held
    whole on each rank: one graph forward and one backward, fixed shapes
    (the queue term reads every slot, empty ones masked by id -1)."""
    return torch.compile(uto_terms, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)


def uto_loss(img: torch.Tensor, txt: torch.Tensor, img_k: torch.Tensor, txt_k: torch.Tensor,
             image_ids: torch.Tensor, queue: Optional[NegativeQueues],
             cfg: LossConfig, terms: Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = None,
             ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """UTO loss of this rank's queries.

    Args:
        img, txt: online embeddings (B, E), unit norm, with gradient.
        img_k, txt_k: momentum keys (B, E), unit norm, no gradient.
        image_ids: (B,) int64; equal ids are never negatives of each other
            (unless cfg.mask_same_image is off).
        queue: the negative queues (read only here; enqueue after), or None.
        cfg: mu, gamma, batch_weight, queue_weight, mask_same_image.
        terms: a compiled ``uto_terms`` (``compiled_uto_terms``), used unless
            the pool is distributed (sharded over several ranks: collectives
            between its parts).
    Returns:
        loss (scalar, fp32) and detached scalar statistics: loss_batch,
        loss_queue, pos_sim, hardest_neg, active_neg_frac, queue_fill.
        Collective when world_size > 1: every rank must call it.
    """
    with torch.autocast(device_type=img.device.type, enabled=False):
        img, txt = img.float(), txt.float()
        ids = image_ids.to(img.device, torch.long)
        img_all, txt_all = all_gather_with_grad(img), all_gather_with_grad(txt)  # (W*B, E)
        ids_all = all_gather_nograd(ids)  # (W*B,)
        with_queue = queue is not None and cfg.queue_weight > 0
        # Every slot held here, filled or not: fixed shapes (empty slots have id -1).
        q_image, q_text, q_ids = (queue.image, queue.text, queue.ids) if with_queue else (None, None, None)
        distributed_pool = with_queue and queue.sharded and world_size() > 1
        fn = uto_terms if terms is None or distributed_pool else terms
        loss, stats = fn(img, txt, img_all, txt_all, ids, ids_all, img_k.float(), txt_k.float(),
                         q_image, q_text, q_ids, distributed_pool, cfg.mu, cfg.gamma, cfg.batch_weight,
                         cfg.queue_weight, cfg.mask_same_image, rank())
    # A copy: a CUDA graph (train.compile=reduce-overhead) reuses its outputs' memory at the next step.
    out = dict(zip(STAT_NAMES, stats.clone().unbind()))
    fill = queue.fill / queue.pool_size if queue is not None else 0.0
    out["queue_fill"] = torch.full((), fill, device=img.device)
    return loss, out
