"""The negative queues: past key embeddings of both modalities, with image ids.

One global ring buffer of P = world_size x size_per_rank slots per modality.
Every step the keys of all ranks are all-gathered (rank order) and written
at the ring pointer, wrapping at P (no divisibility assumption); the oldest
entries are overwritten (FIFO). Slot s belongs to rank s // size_per_rank.

- ``replicated``: every rank stores all P slots (like MoCo); the keys of all
  ranks are all-gathered every step (each rank receives W B keys).
- ``sharded``: a rank stores only its own size_per_rank slots; the loss over
  the pool is computed distributed (user_dist.loss), so per-rank memory is
  constant as the cluster grows. Each key goes straight to the rank that owns
  its slot (one all-to-all whose split sizes follow from the pointer, on the
  host): a rank sends its B keys and receives at most size_per_rank, instead
  of all W B. Both modes hold the same pool, slot for slot.

The pool starts as ``queue.init`` says:

- ``empty`` (default): every slot holds id EMPTY_ID (-1). Entries are written
  in order from slot 0, so the filled slots are always the global prefix
  [0, fill): empty slots are simply never read.
- ``random`` (the authors' code): every slot holds an L2-normalised Gaussian
  vector (a different one per modality) with id RANDOM_ID (-2), and fill = P
  from the start. They count as negatives of every query until keys
  overwrite them, oldest first from slot 0. Slot s's vectors depend only on
  s and a fixed seed, so every rank, both modes, and any world size agree on
  them without a broadcast.

A step skipped on the device (``enqueue(keep=False)``) advances the ring
without writing, so its slots keep what they held: id -1 (never counted)
where they were empty, the random vectors (still negatives) where the pool
started random. Image ids are never negative: the loss counts every slot
whose id is not EMPTY_ID. Pointer and fill level are host integers that
follow from the batch shapes alone, so nothing here waits for the device.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from user_dist.config import QueueConfig
from user_dist.distributed import all_gather_nograd, rank, world_size

MODES = ("replicated", "sharded")
INITS = ("empty", "random")
EMPTY_ID = -1  # a slot never written: never a negative
RANDOM_ID = -2  # a random vector of queue.init=random: a negative of every query, like a real key
RANDOM_SEED = 20240131  # the random pool is the same in every run (and on every rank)
_RANDOM_BLOCK = 1024  # slots per generator seed: slot s's vectors follow from s alone


def random_slots(first: int, count: int, embed_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The random pool's vectors of global slots [first, first + count), count
    > 0: image and text (count, E), fp32, unit norm, on the CPU. Generated a block of
    _RANDOM_BLOCK slots at a time, each block from its own seed, so that a rank
    makes only the blocks that cover its own slots."""
    image, text = [], []
    for block in range(first // _RANDOM_BLOCK, -(-(first + count) // _RANDOM_BLOCK)):
        g = torch.Generator().manual_seed(RANDOM_SEED + block)
        pair = torch.randn(_RANDOM_BLOCK, 2, embed_size, generator=g)  # (block, 2, E): image, text
        pair = F.normalize(pair, dim=-1)
        lo = max(first - block * _RANDOM_BLOCK, 0)
        hi = min(first + count - block * _RANDOM_BLOCK, _RANDOM_BLOCK)
        image.append(pair[lo:hi, 0])
        text.append(pair[lo:hi, 1])
    return torch.cat(image), torch.cat(text)


class Segment(NamedTuple):
    """A run of consecutive keys of one step that land in one rank's slots."""

    source: int  # the rank whose batch holds them
    row: int  # first row in that rank's batch
    owner: int  # the rank that stores them
    slot: int  # first global slot
    length: int


def write_segments(ptr: int, world: int, batch: int, pool: int, size_per_rank: int) -> List[Segment]:
    """Where one step's W x B keys go: global key j = source x B + row lands in
    slot (ptr + j) mod pool, owned by rank slot // size_per_rank. Runs of
    consecutive keys with the same source and owner, in key order; host
    arithmetic only (ptr is a host integer)."""
    out = []
    n = world * batch
    j = 0
    while j < n:
        slot = (ptr + j) % pool
        owner = slot // size_per_rank
        source = j // batch
        # The run ends at the source's last row, the owner's last slot or the end of the pool.
        length = min(n - j, (source + 1) * batch - j, (owner + 1) * size_per_rank - slot, pool - slot)
        out.append(Segment(source, j - source * batch, owner, slot, length))
        j += length
    return out


class NegativeQueues:
    """Image and text key queues (fp32) with their image ids.

    Args:
        cfg: queue.size_per_rank, queue.mode and queue.init.
        embed_size: E, the embedding size.
        device: where the entries live (the engine's device).
    """

    def __init__(self, cfg: QueueConfig, embed_size: int, device: Union[str, torch.device] = "cpu"):
        if cfg.mode not in MODES:
            raise ValueError(f"queue.mode is '{cfg.mode}'; valid choices: {', '.join(MODES)}")
        if cfg.init not in INITS:
            raise ValueError(f"queue.init is '{cfg.init}'; valid choices: {', '.join(INITS)}")
        self.mode, self.size_per_rank, self.embed_size = cfg.mode, cfg.size_per_rank, embed_size
        self.init = cfg.init
        self.world, self.rank = world_size(), rank()
        self.pool_size = self.world * self.size_per_rank  # P
        # Global slots held here: [offset, offset + local).
        self.local = self.pool_size if self.mode == "replicated" else self.size_per_rank
        self.offset = 0 if self.mode == "replicated" else self.rank * self.size_per_rank
        self.image = torch.zeros(self.local, embed_size, device=device)  # (local, E)
        self.text = torch.zeros(self.local, embed_size, device=device)  # (local, E)
        self.ids = torch.full((self.local,), EMPTY_ID, dtype=torch.long, device=device)  # (local,)
        self.ptr = 0  # next global slot to write
        self.fill = 0  # filled global slots: [0, fill)
        self._randomise_from(0)

    def _randomise_from(self, first: int) -> None:
        """queue.init=random: global slots [first, P) get their random vectors
        (id RANDOM_ID) and the pool counts as full. Those held here are made;
        with 'empty' they stay empty."""
        if self.init != "random":
            return
        a = max(first, self.offset)
        b = self.offset + self.local
        if a < b:
            image, text = random_slots(a, b - a, self.embed_size)
            rows = slice(a - self.offset, b - self.offset)
            self.image[rows], self.text[rows] = image.to(self.image.device), text.to(self.text.device)
            self.ids[rows] = RANDOM_ID
        self.fill = self.pool_size

    @property
    def sharded(self) -> bool:
        return self.mode == "sharded"

    def to(self, device) -> "NegativeQueues":
        self.image, self.text, self.ids = self.image.to(device), self.text.to(device), self.ids.to(device)
        return self

    def entries(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled slots held by this rank: image (V, E), text (V, E), ids (V,)."""
        v = min(max(self.fill - self.offset, 0), self.local)
        return self.image[:v], self.text[:v], self.ids[:v]

    def _put(self, at: int, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor,
             keep: Optional[torch.Tensor]) -> None:
        """Write rows (n, E), (n, E), (n,) at local slot ``at``. With ``keep``
        (0-d bool on the device) False the slots keep what they hold: the
        choice is made on the device, so the host never waits for it."""
        dst = slice(at, at + ids.shape[0])
        if keep is not None:
            image = torch.where(keep, image, self.image[dst])
            text = torch.where(keep, text, self.text[dst])
            ids = torch.where(keep, ids, self.ids[dst])
        self.image[dst], self.text[dst], self.ids[dst] = image, text, ids

    @torch.no_grad()
    def enqueue(self, img_k: torch.Tensor, txt_k: torch.Tensor, image_ids: torch.Tensor,
                keep: Optional[torch.Tensor] = None) -> None:
        """Write this step's keys of every rank: img_k, txt_k (B, E), image_ids (B,).

        ``keep``: a 0-d bool tensor, the same on every rank; False leaves every
        slot as it was (a step skipped on the device for a non-finite loss,
        whose keys may be non-finite too). The ring still advances: slots
        left empty keep id -1, which the loss never counts (random slots of
        queue.init=random stay random negatives).
        Collective: every rank must call it with the same B.
        """
        n = self.world * img_k.shape[0]
        if n > self.pool_size:
            raise ValueError(f"{n} keys per step (world {self.world} x batch {img_k.shape[0]}) do not fit a pool "
                             f"of {self.pool_size}; raise queue.size_per_rank to at least train.batch_size")
        if self.sharded and self.world > 1:
            self._enqueue_to_owners(img_k, txt_k, image_ids, keep)
            return
        img = all_gather_nograd(img_k.detach().float())  # (W*B, E)
        txt = all_gather_nograd(txt_k.detach().float())
        ids = all_gather_nograd(image_ids.to(self.ids.device, torch.long))
        # Split the ring write [ptr, ptr + n) at the wrap, then keep what lies in [offset, offset + local).
        start = 0
        for lo in (self.ptr, 0) if self.ptr + n > self.pool_size else (self.ptr,):
            hi = min(lo + n - start, self.pool_size)
            a, b = max(lo, self.offset), min(hi, self.offset + self.local)
            if a < b:
                src = slice(start + a - lo, start + b - lo)
                self._put(a - self.offset, img[src], txt[src], ids[src], keep)
            start += hi - lo
        self.ptr = (self.ptr + n) % self.pool_size
        self.fill = min(self.fill + n, self.pool_size)

    def _enqueue_to_owners(self, img_k: torch.Tensor, txt_k: torch.Tensor, image_ids: torch.Tensor,
                           keep: Optional[torch.Tensor]) -> None:
        """Sharded enqueue: every key travels only to the rank that stores its
        slot, in one all-to-all for the embeddings and one for the ids."""
        B = img_k.shape[0]
        segs = write_segments(self.ptr, self.world, B, self.pool_size, self.size_per_rank)
        # What this rank sends, by destination rank (all_to_all's order), and what it receives, by source.
        mine = sorted((s for s in segs if s.source == self.rank), key=lambda s: (s.owner, s.row))
        theirs = sorted((s for s in segs if s.owner == self.rank), key=lambda s: (s.source, s.row))
        send = [0] * self.world
        for seg in mine:
            send[seg.owner] += seg.length
        recv = [0] * self.world
        for seg in theirs:
            recv[seg.source] += seg.length
        keys = torch.cat([img_k.detach().float(), txt_k.detach().float()], 1)  # (B, 2E)
        ids = image_ids.to(self.ids.device, torch.long)

        def outgoing(t: torch.Tensor) -> torch.Tensor:  # this rank's rows in send order
            return torch.cat([t[s.row:s.row + s.length] for s in mine]) if mine else t[:0]

        got_keys = keys.new_empty(sum(recv), keys.shape[1])
        got_ids = ids.new_empty(sum(recv))
        dist.all_to_all_single(got_keys, outgoing(keys).contiguous(), recv, send)
        dist.all_to_all_single(got_ids, outgoing(ids).contiguous(), recv, send)
        E, at = self.embed_size, 0
        for seg in theirs:
            rows = slice(at, at + seg.length)
            self._put(seg.slot - self.offset, got_keys[rows, :E], got_keys[rows, E:], got_ids[rows], keep)
            at += seg.length
        self.ptr = (self.ptr + self.world * B) % self.pool_size
        self.fill = min(self.fill + self.world * B, self.pool_size)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> Dict[str, object]:
        """This rank's slots and the ring's position: tensors and ints only."""
        return {"image": self.image.clone(), "text": self.text.clone(), "ids": self.ids.clone(),
                "ptr": self.ptr, "fill": self.fill, "mode": self.mode, "world_size": self.world,
                "rank": self.rank, "size_per_rank": self.size_per_rank}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore this rank's own state, saved by a job of the same layout
        (world size, size_per_rank, mode); ValueError otherwise, saying so.
        Another layout goes through :meth:`redistribute`."""
        if (state["world_size"], state["size_per_rank"], state["mode"]) != (self.world, self.size_per_rank,
                                                                            self.mode):
            raise ValueError(f"queue state of {state['world_size']} ranks x {state['size_per_rank']} slots "
                             f"({state['mode']}) does not match this queue ({self.world} x {self.size_per_rank}, "
                             f"{self.mode}); lay it out afresh with redistribute()")
        self._check_layout(state)
        dev = self.image.device
        self.image.copy_(state["image"].to(dev))
        self.text.copy_(state["text"].to(dev))
        self.ids.copy_(state["ids"].to(dev))
        self.ptr, self.fill = int(state["ptr"]), int(state["fill"])

    def redistribute(self, states: Sequence[Dict[str, object]]) -> None:
        """Lay out afresh the pool of another layout (world size, size or mode).

        ``states``: the saving job's queue states in rank order (a replicated
        queue: rank 0's alone is enough). The newest min(fill, new pool size)
        entries are laid out in the new ring, in FIFO order. With
        queue.init=random, slots left over get their random vectors, as the
        oldest entries (overwritten first).
        """
        image, text, ids = self._fifo_pool(list(states))
        self._lay_out(image, text, ids)

    def _check_layout(self, s: Dict[str, object]) -> None:
        if s["image"].shape != self.image.shape or s["ids"].shape != self.ids.shape:
            raise ValueError(f"queue state of shape {tuple(s['image'].shape)} does not match this queue "
                             f"{tuple(self.image.shape)}")
        if self.mode == "sharded" and s["rank"] != self.rank:
            raise ValueError(f"sharded queue state of rank {s['rank']} loaded on rank {self.rank}")

    @staticmethod
    def _fifo_pool(states: List[Dict[str, object]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank's states -> the filled pool, oldest first: (V, E), (V, E), (V,)."""
        s0 = states[0]
        world, spr = int(s0["world_size"]), int(s0["size_per_rank"])
        if s0["mode"] == "sharded":
            if len(states) != world:
                raise ValueError(f"redistributing a sharded queue needs the states of all {world} ranks that "
                                 f"saved it, got {len(states)}; pass the list of every rank's queue state")
            states = sorted(states, key=lambda s: s["rank"])
            cat = lambda k: torch.cat([s[k].cpu() for s in states])  # noqa: E731
            image, text, ids = cat("image"), cat("text"), cat("ids")
        else:
            image, text, ids = s0["image"].cpu(), s0["text"].cpu(), s0["ids"].cpu()
        pool, ptr, fill = world * spr, int(s0["ptr"]), int(s0["fill"])
        order = torch.arange(fill) if fill < pool else (torch.arange(pool) + ptr) % pool
        return image[order], text[order], ids[order]

    def _lay_out(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
        """Fill the ring afresh from entries oldest first, keeping the newest."""
        keep = min(ids.shape[0], self.pool_size)
        first = ids.shape[0] - keep
        image, text, ids = image[first:], text[first:], ids[first:]
        a, b = self.offset, min(self.offset + self.local, keep)
        dev = self.image.device
        self.image.zero_()
        self.text.zero_()
        self.ids.fill_(EMPTY_ID)
        if a < b:
            self.image[:b - a] = image[a:b].to(dev)
            self.text[:b - a] = text[a:b].to(dev)
            self.ids[:b - a] = ids[a:b].to(dev)
        self.ptr, self.fill = keep % self.pool_size, keep
        self._randomise_from(keep)
