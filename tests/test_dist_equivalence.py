"""N gloo ranks with batch B each == one process with batch N*B.

The real training step (user_dist.train_step.TrainStep: DeepSpeed engine,
regions tower with SGE + CGE image and text guides, BERT, fp32 momentum
towers, queues, UTO) runs three optimiser steps on two real gloo ranks, in
both queue modes, and in one process with the global batch. The queue wraps
at the third step (8 keys per step, pool of 12). BatchNorm statistics are
synchronised across ranks (model.sync_norm, the default), so the losses,
every parameter's gradient at every step (read through the step's own phase
clock), the momentum towers and the queue pool agree to float32 tolerance.
Dropout is off.
"""
import os
import traceback

import pytest
import torch

from conftest import free_port, run_forked_ranks
from dist_scripts.tiny_setup import train_steps

WORLD, SIZE_PER_RANK = 2, 6
TOL = dict(rtol=1e-4, atol=2e-5)


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a ``world``-rank DeepSpeed job: both queue modes on 2
    ranks, the replicated one alone with the global pool on 1; rank 0 saves."""
    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        from user_dist import distributed as du

        du.init_distributed(timeout_s=300)
        for mode in ("replicated", "sharded") if world > 1 else ("replicated",):
            result = train_steps(mode, SIZE_PER_RANK * WORLD // world)
            if rank == 0:
                torch.save(result, f"{out}.{world}.{mode}.pt")
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)  # a forked child must not run the parent's pytest teardown


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("equiv") / "result")
    # Forked ranks reuse this process's imports (BERT's and DeepSpeed's take seconds).
    import deepspeed  # noqa: F401
    import transformers

    transformers.BertModel  # noqa: B018 (resolves the lazy import before forking)

    def one_process():  # the global batch, while the two ranks run
        run_forked_ranks(_rank_main, 1, 1, free_port(), out, timeout=600)

    run_forked_ranks(_rank_main, WORLD, WORLD, free_port(), out, between=one_process, timeout=600)
    load = lambda name: torch.load(f"{out}.{name}.pt", weights_only=True)  # noqa: E731
    return {"single": load("1.replicated"), "replicated": load("2.replicated"), "sharded": load("2.sharded")}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_loss_matches_one_process_with_the_global_batch(runs, mode):
    torch.testing.assert_close(runs[mode]["losses"], runs["single"]["losses"], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_every_gradient_matches_one_process_with_the_global_batch(runs, mode):
    for step, (got, want) in enumerate(zip(runs[mode]["grads"], runs["single"]["grads"])):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"step {step} {name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_momentum_towers_match_after_the_updates(runs, mode):
    want = runs["single"]["momentum"]
    for name, value in runs[mode]["momentum"].items():
        torch.testing.assert_close(value, want[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_queue_pool_matches_slot_for_slot(runs, mode):
    got, want = runs[mode], runs["single"]
    assert (got["fill"], got["ptr"]) == (want["fill"], want["ptr"]) == (12, 0)
    torch.testing.assert_close(got["pool"][2], want["pool"][2])
    torch.testing.assert_close(got["pool"][0], want["pool"][0], **TOL)
    torch.testing.assert_close(got["pool"][1], want["pool"][1], **TOL)


@pytest.mark.slow
def test_sharded_and_replicated_queues_give_the_same_loss_and_gradients(runs):
    torch.testing.assert_close(runs["sharded"]["losses"], runs["replicated"]["losses"], **TOL)
    for got, want in zip(runs["sharded"]["grads"], runs["replicated"]["grads"]):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
