"""The ring buffer of keys: wrap-around, fill level, checkpoint round trip, redistribution."""
import pytest
import torch

from user_dist.config import QueueConfig
from user_dist.queue import NegativeQueues

E = 4


def _keys(step, n=3):
    """Batch `step` of n keys whose values encode the entry's stream position."""
    first = step * n
    pos = torch.arange(first, first + n, dtype=torch.float32)
    return pos[:, None].expand(n, E).clone(), -pos[:, None].expand(n, E).clone(), torch.arange(first, first + n) + 1000


def _fill(queue, steps, n=3):
    for s in range(steps):
        queue.enqueue(*_keys(s, n))


def test_ring_wraps_with_a_batch_that_does_not_divide_the_queue():
    queue = NegativeQueues(QueueConfig(size_per_rank=10), E)
    _fill(queue, 5)  # 15 entries through 10 slots: entry k sits in slot k % 10
    assert (queue.ptr, queue.fill) == (5, 10)
    expect = torch.tensor([10, 11, 12, 13, 14, 5, 6, 7, 8, 9], dtype=torch.float32)
    image, text, ids = queue.entries()
    torch.testing.assert_close(image[:, 0], expect)
    torch.testing.assert_close(text[:, 0], -expect)
    torch.testing.assert_close(ids, expect.long() + 1000)


def test_a_partly_filled_queue_exposes_only_written_slots():
    queue = NegativeQueues(QueueConfig(size_per_rank=10), E)
    assert queue.entries()[2].numel() == 0
    _fill(queue, 2)
    image, _, ids = queue.entries()
    assert image.shape == (6, E) and queue.fill == 6
    torch.testing.assert_close(ids, torch.arange(6) + 1000)


def test_a_step_larger_than_the_pool_is_refused():
    queue = NegativeQueues(QueueConfig(size_per_rank=2), E)
    with pytest.raises(ValueError, match="queue.size_per_rank"):
        queue.enqueue(*_keys(0, 3))


def test_state_dict_round_trip_continues_identically():
    queue = NegativeQueues(QueueConfig(size_per_rank=10), E)
    _fill(queue, 4)
    restored = NegativeQueues(QueueConfig(size_per_rank=10), E)
    restored.load_state_dict(queue.state_dict())
    for q in (queue, restored):
        q.enqueue(*_keys(4))
    assert (restored.ptr, restored.fill) == (queue.ptr, queue.fill)
    for a, b in zip(restored.entries(), queue.entries()):
        torch.testing.assert_close(a, b)


def _as_sharded_states(queue, world):
    """The per-rank states a `world`-rank sharded job with the same global pool would save
    (both modes hold the same pool slot for slot; tests/test_dist_equivalence.py checks it)."""
    s = queue.state_dict()
    spr = queue.pool_size // world
    return [dict(s, image=s["image"][r * spr:(r + 1) * spr], text=s["text"][r * spr:(r + 1) * spr],
                 ids=s["ids"][r * spr:(r + 1) * spr], mode="sharded", world_size=world, rank=r,
                 size_per_rank=spr) for r in range(world)]


def test_restore_onto_another_world_size_keeps_the_newest_entries_in_order():
    two_ranks = NegativeQueues(QueueConfig(size_per_rank=12), E)
    _fill(two_ranks, 5)  # entries 0..14 through 12 slots: 3..14 remain
    states = _as_sharded_states(two_ranks, world=2)
    one_rank = NegativeQueues(QueueConfig(size_per_rank=8), E)
    one_rank.redistribute(states)
    assert (one_rank.ptr, one_rank.fill) == (0, 8)
    torch.testing.assert_close(one_rank.entries()[2], torch.arange(7, 15) + 1000)  # the newest 8, oldest first
    one_rank.enqueue(*_keys(5))  # FIFO goes on: 15..17 replace 7..9
    torch.testing.assert_close(one_rank.entries()[2][:3], torch.arange(15, 18) + 1000)


def test_a_single_state_from_another_world_size_is_refused():
    two_ranks = NegativeQueues(QueueConfig(size_per_rank=12), E)
    _fill(two_ranks, 2)
    one_rank = NegativeQueues(QueueConfig(size_per_rank=6), E)
    with pytest.raises(ValueError, match="does not match this queue.*redistribute"):
        one_rank.load_state_dict(_as_sharded_states(two_ranks, world=2)[0])
    with pytest.raises(ValueError, match="all 2 ranks"):
        one_rank.redistribute(_as_sharded_states(two_ranks, world=2)[:1])
