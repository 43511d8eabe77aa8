"""The training loop's small parts: the step window's timing, the one skip
policy, the fault hooks, and the all-ranks-agree helper on real gloo ranks."""
import logging

import pytest
import torch

from conftest import run_gloo_ranks
from user_dist import distributed as du
from user_dist.faults import Faults
from user_dist.nonfinite import HostSkips, SkipPolicy
from user_dist.trainer import StepWindow


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_step_time_covers_every_micro_batch_of_an_accumulation_window():
    clock = FakeClock()
    window = StepWindow(3, clock)
    closed = []
    for micro in range(6):
        clock.now += 10.0  # waiting for data: not the step's time
        with window.timed():
            clock.now += 1.0 + micro  # micro-steps of 1, 2, 3 s, then 4, 5, 6 s
        closed.append(window.complete())
        if closed[-1]:
            assert window.seconds == (6.0 if micro == 2 else 15.0)
    assert closed == [False, False, True, False, False, True]


def test_a_dropped_micro_batch_counts_in_the_time_of_its_step():
    clock = FakeClock()
    window = StepWindow(1, clock)
    with window.timed():
        clock.now += 2.0  # dropped (non-finite loss): no complete()
    with window.timed():
        clock.now += 1.0
    assert window.complete() and window.seconds == 3.0


def test_one_skip_policy_counts_host_skips_and_stops_after_the_limit(caplog):
    counts = HostSkips()
    policy = SkipPolicy(counts, limit=3, done_before=5)  # 5 skipped by earlier processes of the run
    caplog.set_level(logging.WARNING, logger="user_dist")
    nan = torch.tensor(float("nan"))
    assert counts.check_loss(nan) is False
    assert policy.update(step=2) == 6
    assert "non-finite loss or gradient: 1 micro-batch(es) skipped by step 2 (6 in all)" in caplog.text
    assert counts.check_loss(torch.tensor(1.0)) is True  # a finite loss ends the run of skips
    counts.check_loss(nan)
    counts.check_loss(nan)
    assert policy.update(step=2) == 8
    counts.check_loss(nan)
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row at step 2: stopping"):
        policy.update(step=2)


def test_fault_hooks_are_parsed_per_rank_and_poison_the_asked_micro_batches():
    env = {"USER_DIST_FAULT_NAN": "2:1,5:2@1", "USER_DIST_FAULT_KILL": "7@1"}
    assert Faults.from_env(env, rank=0) == Faults({2: 1}, None)
    rank1 = Faults.from_env(env, rank=1)
    assert rank1 == Faults({2: 1, 5: 2}, 7)
    loss = torch.tensor(1.0)
    assert [bool(torch.isnan(rank1.poison(loss, 5))) for _ in range(3)] == [True, True, False]
    assert bool(torch.isfinite(rank1.poison(loss, 4)))
    assert Faults.from_env({}, rank=0) == Faults()


def _agree_rank(rank: int) -> dict:
    flags = [rank == 0, True, False]
    return {"any": du.agree(flags, "any").tolist(), "all": du.agree(flags, "all").tolist(),
            "tensor": du.agree(torch.tensor(rank == 1), "any").item()}


def test_every_rank_takes_the_same_decision():
    for got in run_gloo_ranks(_agree_rank, 2, timeout=120):
        assert got == {"any": [1, 1, 0], "all": [0, 1, 0], "tensor": 1}
    assert du.agree([True, False], "all").tolist() == [1, 0]  # one process: its own flags
