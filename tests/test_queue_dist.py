"""The sharded queue's enqueue on real gloo ranks: every key reaches the rank
that owns its slot (one all-to-all), and the shards put together equal the
replicated pool and a plain ring built from all keys, slot for slot, after
every step, through wraps, a step the size of the whole pool, batches that
divide nothing, and a step skipped on the device (keep=False: the ring
advances, nothing is written)."""

import pytest
import torch
import torch.distributed as dist

from conftest import run_gloo_ranks
from user_dist.config import QueueConfig
from user_dist.queue import NegativeQueues, write_segments

WORLD, E, STEPS = 3, 4, 7
SKIPPED = 2  # the step enqueued with keep=False
# (batch per rank, size_per_rank, first pointer): pool 9 with 6 keys a step; pool 12 filled by one step,
# from slot 0 and from slot 5 (as after a restore onto another world size: rank 1 then receives keys from
# both ends of the step); pool 15 with 3; pool 21 with 15.
CASES = [(2, 3, 0), (4, 4, 0), (4, 4, 5), (1, 5, 0), (5, 7, 0)]


def step_keys(step: int, rank: int, batch: int):
    """Keys of one rank at one step; values encode (step, global key index)."""
    j = torch.arange(rank * batch, (rank + 1) * batch, dtype=torch.float32) + 100 * step
    return j[:, None].expand(batch, E).clone(), -j[:, None].expand(batch, E).clone(), j.long() + 10_000


def reference_ring(batch: int, size_per_rank: int, ptr: int, steps: int):
    """The pool after ``steps`` steps from slot ``ptr``, by a plain loop over every key in order."""
    pool = WORLD * size_per_rank
    image, ids = torch.zeros(pool, E), torch.full((pool,), -1, dtype=torch.long)
    for step in range(steps):
        for r in range(WORLD):
            img, _, i = step_keys(step, r, batch)
            for k in range(batch):
                if step != SKIPPED:
                    image[ptr], ids[ptr] = img[k], i[k]
                ptr = (ptr + 1) % pool
    return image, ids


def _rank_main(rank: int) -> list:
    results = []
    for batch, spr, ptr in CASES:
        queues = {m: NegativeQueues(QueueConfig(mode=m, size_per_rank=spr), E) for m in ("replicated", "sharded")}
        for q in queues.values():
            q.ptr = ptr
        for step in range(STEPS):
            for q in queues.values():
                q.enqueue(*step_keys(step, rank, batch), keep=torch.tensor(step != SKIPPED))
            shards = [torch.empty(spr, 2 * E + 1) for _ in range(WORLD)]
            s = queues["sharded"]
            dist.all_gather(shards, torch.cat([s.image, s.text, s.ids[:, None].float()], 1))
            rep = queues["replicated"]
            results.append({"case": (batch, spr, ptr), "step": step, "pool": torch.cat(shards),
                            "replicated": torch.cat([rep.image, rep.text, rep.ids[:, None].float()], 1),
                            "ptr": (s.ptr, rep.ptr), "fill": (s.fill, rep.fill)})
    return results


@pytest.fixture(scope="module")
def results():
    return run_gloo_ranks(_rank_main, WORLD, timeout=120)[0]


def test_sharded_shards_equal_the_replicated_pool_after_every_step(results):
    assert len(results) == len(CASES) * STEPS
    for r in results:
        assert torch.equal(r["pool"], r["replicated"]), (r["case"], r["step"])
        assert r["ptr"][0] == r["ptr"][1] and r["fill"][0] == r["fill"][1]


def test_the_pool_is_the_ring_of_every_key_in_order(results):
    for r in results:
        batch, spr, ptr = r["case"]
        image, ids = reference_ring(batch, spr, ptr, r["step"] + 1)
        assert torch.equal(r["pool"][:, :E], image), (r["case"], r["step"])
        assert torch.equal(r["pool"][:, 2 * E], ids.float())


@pytest.mark.parametrize("ptr", range(12))
def test_write_segments_cover_each_key_once_in_its_owners_slots(ptr):
    batch, spr = 4, 4  # pool 12, a step fills it exactly
    segs = write_segments(ptr, WORLD, batch, WORLD * spr, spr)
    keys = [s.source * batch + s.row + k for s in segs for k in range(s.length)]
    assert keys == list(range(WORLD * batch))
    for s in segs:
        slots = [(s.slot + k) for k in range(s.length)]
        assert all(x // spr == s.owner for x in slots) and max(slots) < WORLD * spr
        assert all((ptr + s.source * batch + s.row + k) % (WORLD * spr) == s.slot + k for k in range(s.length))
