"""Cached gradient accumulation (train.accum_mode=cached, GradCache) against
one big batch, and plain accumulation against its own definition.

The real TrainStep (DeepSpeed engine, regions tower with SGE + CGE, BERT,
fp32 key towers, queues, UTO), fp32, on forked DeepSpeed ranks:

- big batch: ``grad_accum=3`` cached over micro-batches of B equals one
  batch of 3 B with ``grad_accum=1`` on the same ranks (1 rank; 2 gloo ranks
  with the replicated and the sharded pool): losses, every gradient, the
  parameters, the queue pool and the key towers after two optimiser steps
  (the second sees the first's keys in its queue, which wraps). This needs
  a model whose forward treats every sample on its own: dropout is off and
  the BatchNorms use their running statistics (eval mode), since a
  micro-batch's own batch statistics differ from the big batch's.
- dropout and batch statistics: with dropout on and BatchNorm in training
  mode, the cached gradients equal plain autograd on the micro-batches'
  forwards concatenated, drawn from the same generator state in the same
  order (an independent computation with the model alone); the running
  statistics move once per micro-batch, and the global generator ends
  where that single pass leaves it.
- plain: with lr 1e-30 (nothing moves measurably), ``grad_accum=2`` plain accumulation's
  gradient is the mean of the two micro-batches' own gradients, the second
  one's loss seeing the first one's keys in the queue; cached accumulation
  gives a different one.
- a non-finite loss skips the whole window (on the device; on the host
  with ZeRO 1, before any backward, keeping DeepSpeed's micro-step count).
- the training job with cached accumulation resumes exactly.
"""
import os
import tempfile
import traceback

import pytest
import torch

from conftest import free_port, run_forked_ranks
from dist_scripts.tiny_setup import TRAIN_STEP_OVERRIDES, GradientTap, make_batch

K = 3  # micro-batches per optimiser step
GLOBAL = 12  # pairs per optimiser step over all ranks
POOL = 18  # queue slots over all ranks: the second step's keys wrap
TOL = dict(rtol=1e-5, atol=1e-6)  # float32, different summation orders
# Image ids repeat inside a step (across micro-batches and ranks) and across steps.
STEP_IDS = [[0, 1, 2, 3, 4, 1, 6, 7, 0, 9, 10, 4], [8, 3, 12, 13, 14, 15, 0, 17, 8, 19, 2, 21]]


# gamma 0, mu 20: about half the negatives are active at random initialisation
# (at gamma 0.5 almost none are), so which pairs are negatives of which shows.
LOSS = ["loss.gamma=0.0", "loss.mu=20.0"]


def _cfg(world: int, extra=()):
    from user_dist.config import load_config

    return load_config(None, TRAIN_STEP_OVERRIDES + LOSS + [f"queue.size_per_rank={POOL // world}"] + list(extra))


def _rank_batches(n: int, rank: int, world: int):
    """This rank's share of step n's global batch: (GLOBAL / world) pairs."""
    ids = STEP_IDS[n]
    per_rank = GLOBAL // world
    full = make_batch(n + 1, GLOBAL, ids=ids)
    return {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in full.items()}


def _split(batch, k: int):
    b = batch["image_ids"].shape[0] // k
    return [{key: v[j * b:(j + 1) * b] for key, v in batch.items()} for j in range(k)]


def _freeze_batchnorm(step) -> None:
    """Online BatchNorms on running statistics: every sample's embedding then
    depends on that sample alone (the towers' only cross-sample coupling)."""
    from user_dist.models.gse import MaskedBatchNorm

    for m in step.engine.module.modules():
        if isinstance(m, MaskedBatchNorm):
            m.eval()


def _pool(queue):
    from user_dist.distributed import all_gather_nograd

    parts = (queue.image, queue.text, queue.ids)
    return tuple(all_gather_nograd(t) for t in parts) if queue.sharded else tuple(t.clone() for t in parts)


# Setups compared, by name: their overrides.
VARIANTS = {"replicated": ["queue.mode=replicated"], "sharded": ["queue.mode=sharded"],
            "zero2": ["train.zero_stage=2"]}  # ZeRO 2: gradients reduced and partitioned at every micro-step


def _two_steps(world: int, rank: int, variant: str, cached: bool) -> dict:
    """Two optimiser steps, cached over K micro-batches or as one batch."""
    from user_dist.train_step import TrainStep

    per_rank = GLOBAL // world
    extra = VARIANTS[variant] + ([f"train.batch_size={per_rank // K}", f"train.grad_accum={K}",
                                  "train.accum_mode=cached"] if cached else [f"train.batch_size={per_rank}"])
    step = TrainStep(_cfg(world, extra), steps_per_epoch=2, total_steps=2)
    _freeze_batchnorm(step)
    step.clock = tap = GradientTap(step)
    losses = []
    for n in range(2):
        batch = _rank_batches(n, rank, world)
        stats = step.cached_step(_split(batch, K), step=n) if cached else step.micro_step(batch, step=n)
        losses.append(stats["loss"].detach().clone())
    return {"losses": torch.stack(losses), "grads": tap.grads, "momentum": step.momentum.state_dict(),
            "params": {n: p.detach().clone() for n, p in step.engine.module.named_parameters()},
            "pool": _pool(step.queue), "ptr": step.queue.ptr, "fill": step.queue.fill,
            "global_steps": step.engine.global_steps, "micro_steps": step.engine.micro_steps}


def big_batch_runs(world: int, rank: int) -> dict:
    variants = ("replicated", "sharded") if world > 1 else ("replicated", "zero2")
    return {(v, cached): _two_steps(world, rank, v, cached) for v in variants for cached in (False, True)}


def dropout_reference(world: int, rank: int) -> dict:
    """One cached step with dropout on and BatchNorm in training mode, after a
    first one (so the queue holds keys and the weights have moved), against
    autograd on the concatenated forwards of an independent copy."""
    from user_dist.loss import uto_loss
    from user_dist.models import build_model
    from user_dist.models.gse import MaskedBatchNorm
    from user_dist.train_step import TrainStep, inputs_to

    cfg = _cfg(world, [f"train.batch_size={GLOBAL // K}", f"train.grad_accum={K}", "train.accum_mode=cached",
                       "model.text.dropout=0.2", "model.gse.sge_dropout=0.4"])
    step = TrainStep(cfg, steps_per_epoch=2, total_steps=2)
    step.cached_step(_split(_rank_batches(0, rank, world), K), step=0)
    micro = _split(_rank_batches(1, rank, world), K)

    # The reference: a copy of the online towers as they are now, their keys and the queue as they are now.
    inputs = [inputs_to(b, step.device, torch.float32) for b in micro]
    with torch.no_grad():
        keys = [step.momentum.encode(b) for b in inputs]

    def reference(seed: int):
        model = build_model(cfg.model, cfg.data.mode)
        model.load_state_dict(step.engine.module.state_dict())
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        torch.manual_seed(seed)
        embs = [model(b) for b in inputs]  # train mode: dropout and batch statistics, one micro-batch at a time
        rng_after = torch.get_rng_state()
        img, txt = torch.cat([e[0] for e in embs]), torch.cat([e[1] for e in embs])
        loss, _ = uto_loss(img, txt, torch.cat([k[0] for k in keys]), torch.cat([k[1] for k in keys]),
                           torch.cat([b["image_ids"] for b in inputs]), step.queue, cfg.loss)
        grads = torch.autograd.grad(loss, [p for _, p in named])
        return model, loss.detach(), dict(zip([n for n, _ in named], grads)), rng_after

    other = reference(99)[2]  # dropout matters: another generator state, other gradients
    model, loss, want, rng_after = reference(1234)

    # The step itself, from the same generator state.
    step.clock = tap = GradientTap(step)
    torch.manual_seed(1234)
    stats = step.cached_step(micro, step=1)
    got = tap.grads[0]
    norms = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
             for n, m in model.named_modules() if isinstance(m, MaskedBatchNorm)}
    norms_got = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
                 for n, m in step.engine.module.named_modules() if isinstance(m, MaskedBatchNorm)}
    return {"want": want, "got": got, "other_seed": other, "loss": loss.detach(), "loss_got": stats["loss"],
            "rng_same": bool(torch.equal(torch.get_rng_state(), rng_after)), "norms": norms, "norms_got": norms_got}


def plain_runs(world: int, rank: int) -> dict:
    """lr 1e-30 (nothing moves measurably): grad_accum=2 plain and cached against two steps of one micro-batch."""
    from user_dist.train_step import TrainStep

    b = GLOBAL // K
    micro = _split(_rank_batches(0, rank, world), K)[:2]
    out = {}
    for name, extra in (("accum", ["train.grad_accum=2"]), ("cached", ["train.grad_accum=2", "train.accum_mode=cached"]),
                        ("single", [])):
        step = TrainStep(_cfg(world, [f"train.batch_size={b}", "optim.lr=1e-30"] + extra), steps_per_epoch=2,
                         total_steps=2)
        _freeze_batchnorm(step)
        step.clock = tap = GradientTap(step)
        if name == "cached":
            step.cached_step(micro, step=0)
        else:
            for n, batch in enumerate(micro):
                step.micro_step(batch, step=n if name == "single" else 0)
        out[name] = {"grads": tap.grads, "pool": _pool(step.queue), "global_steps": step.engine.global_steps}
    return out


def nonfinite_runs(world: int, rank: int) -> dict:
    """A NaN loss in the first window: skipped on the device (ZeRO 0), dropped
    on the host (ZeRO 1); the next window trains."""
    from user_dist.train_step import TrainStep

    out = {}
    for zero in (0, 1):
        step = TrainStep(_cfg(world, [f"train.batch_size={GLOBAL // K}", f"train.grad_accum={K}",
                                      "train.accum_mode=cached", f"train.zero_stage={zero}"]),
                         steps_per_epoch=2, total_steps=2)
        step.faults.nan = {0: 1}
        before = {n: p.detach().clone() for n, p in step.engine.module.named_parameters()}
        first = step.cached_step(_split(_rank_batches(0, rank, world), K), step=0)
        moved = max(float((p - before[n]).abs().max()) for n, p in step.engine.module.named_parameters())
        r = {"first": "None" if first is None else bool(torch.isfinite(first["loss"])), "moved_after_nan": moved,
             "micro_steps_after_nan": step.engine.micro_steps, "queue_ids_after_nan": int((step.queue.ids >= 0).sum())}
        second = step.cached_step(_split(_rank_batches(1, rank, world), K), step=0 if zero else 1)
        r.update(second_finite=bool(torch.isfinite(second["loss"])), global_steps=step.engine.global_steps,
                 moved_after_next=max(float((p - before[n]).abs().max())
                                      for n, p in step.engine.module.named_parameters()),
                 skipped=step.skips.read()[0])
        out[zero] = r
    return out


def small_queue_error(world: int, rank: int) -> str:
    from user_dist.config import ConfigError
    from user_dist.train_step import TrainStep

    try:
        TrainStep(_cfg(world, ["train.batch_size=4", "train.grad_accum=3", "train.accum_mode=cached",
                               "queue.size_per_rank=8"]), steps_per_epoch=1, total_steps=1)
    except ConfigError as exc:
        return str(exc)
    return "no error"


def _rank_main(rank: int, world: int, port: int, out: str, bodies) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        from user_dist import distributed as du

        du.init_distributed(timeout_s=300)
        results = {body.__name__: body(world, rank) for body in bodies}
        torch.save(results, os.path.join(out, f"{world}.{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)  # a forked child must not run the parent's pytest teardown


@pytest.fixture(scope="module")
def runs():
    import deepspeed  # noqa: F401  (forked ranks reuse this process's imports)
    import transformers

    transformers.BertModel  # noqa: B018 (resolves the lazy import before forking)
    with tempfile.TemporaryDirectory() as out:
        def one_rank():  # while the two ranks run
            run_forked_ranks(_rank_main, 1, 1, free_port(), out,
                             (big_batch_runs, dropout_reference, plain_runs, nonfinite_runs, small_queue_error),
                             timeout=600)

        run_forked_ranks(_rank_main, 2, 2, free_port(), out, (big_batch_runs,), between=one_rank, timeout=600)
        load = lambda name: torch.load(os.path.join(out, f"{name}.pt"), weights_only=True)  # noqa: E731
        yield {1: load("1.0"), 2: [load("2.0"), load("2.1")]}


def _close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"{what} {name}: {m}")


def _big_batch_cases(runs):
    for variant in ("replicated", "zero2"):
        yield f"1 rank, {variant}", runs[1]["big_batch_runs"], variant
    for rank in (0, 1):
        for variant in ("replicated", "sharded"):
            yield f"2 ranks (rank {rank}), {variant}", runs[2][rank]["big_batch_runs"], variant


@pytest.mark.slow
def test_cached_accumulation_equals_one_big_batch(runs):
    for where, r, mode in _big_batch_cases(runs):
        big, cached = r[(mode, False)], r[(mode, True)]
        torch.testing.assert_close(cached["losses"], big["losses"], **TOL, msg=lambda m: f"{where} losses: {m}")
        assert len(cached["grads"]) == len(big["grads"]) == 2  # one optimiser phase per step
        # ZeRO 2 keeps its gradients in its own partitions (p.grad is None): there
        # the parameters after the steps (AdamW moves each by lr g / (|g| + 1)) compare them.
        for n in range(2 if mode != "zero2" else 0):
            _close(cached["grads"][n], big["grads"][n], f"{where} step {n} gradient")
        _close(cached["params"], big["params"], f"{where} parameters")
        _close(cached["momentum"], big["momentum"], f"{where} key towers")


@pytest.mark.slow
def test_cached_accumulation_enqueues_like_one_big_batch(runs):
    for where, r, mode in _big_batch_cases(runs):
        big, cached = r[(mode, False)], r[(mode, True)]
        assert (cached["ptr"], cached["fill"]) == (big["ptr"], big["fill"]) == (2 * GLOBAL - POOL, POOL), where
        torch.testing.assert_close(cached["pool"][2], big["pool"][2], msg=lambda m: f"{where} ids: {m}")
        torch.testing.assert_close(cached["pool"][0], big["pool"][0], **TOL)
        torch.testing.assert_close(cached["pool"][1], big["pool"][1], **TOL)


@pytest.mark.slow
def test_deepspeed_counts_one_optimiser_step_per_window(runs):
    for where, r, mode in _big_batch_cases(runs):
        assert (r[(mode, True)]["global_steps"], r[(mode, True)]["micro_steps"]) == (2, 2 * K), where
        assert (r[(mode, False)]["global_steps"], r[(mode, False)]["micro_steps"]) == (2, 2), where


@pytest.mark.slow
def test_cached_gradients_with_dropout_equal_autograd_over_the_concatenated_forwards(runs):
    r = runs[1]["dropout_reference"]
    torch.testing.assert_close(r["loss_got"], r["loss"], **TOL)
    _close(r["got"], r["want"], "gradient")
    # Dropout matters here: another generator state gives other gradients.
    assert max(float((r["other_seed"][n] - r["want"][n]).abs().max()) for n in r["want"]) > 1e-3
    assert r["rng_same"]  # the step draws what one pass over the micro-batches draws


@pytest.mark.slow
def test_cached_accumulation_updates_running_statistics_once_per_micro_batch(runs):
    r = runs[1]["dropout_reference"]
    assert r["norms"] and r["norms"].keys() == r["norms_got"].keys()
    for name, (mean, var, tracked) in r["norms"].items():
        got_mean, got_var, got_tracked = r["norms_got"][name]
        assert got_tracked == tracked == 2 * K, name
        torch.testing.assert_close(got_mean, mean, **TOL)
        torch.testing.assert_close(got_var, var, **TOL)


@pytest.mark.slow
def test_plain_accumulation_averages_each_micro_batchs_own_gradient(runs):
    r = runs[1]["plain_runs"]
    accum, single, cached = r["accum"], r["single"], r["cached"]
    # The tap reads the gradients at each micro-step's optimizer phase: the last is the window's.
    assert len(accum["grads"]) == len(single["grads"]) == 2 and len(cached["grads"]) == 1
    assert accum["global_steps"] == cached["global_steps"] == 1 and single["global_steps"] == 2
    mean = {n: (single["grads"][0][n] + single["grads"][1][n]) / 2 for n in single["grads"][0]}
    _close(accum["grads"][1], mean, "plain gradient")
    for a, b in zip(accum["pool"], single["pool"]):
        torch.testing.assert_close(a, b, **TOL)
    # Cached accumulation is another gradient (in-batch negatives across the micro-batches).
    assert max(float((cached["grads"][0][n] - mean[n]).abs().max()) for n in mean) > 1e-3


@pytest.mark.slow
def test_a_non_finite_window_is_skipped_whole(runs):
    r = runs[1]["nonfinite_runs"]
    device, host = r[0], r[1]
    # ZeRO 0: skipped on the device: nothing moves or is enqueued, DeepSpeed counted the window.
    assert device["first"] is False and device["moved_after_nan"] == 0.0
    assert device["micro_steps_after_nan"] == K and device["queue_ids_after_nan"] == 0
    # ZeRO 1: dropped on the host before any backward; DeepSpeed's count stays at the window's start.
    assert host["first"] == "None" and host["moved_after_nan"] == 0.0
    assert host["micro_steps_after_nan"] == 0 and host["queue_ids_after_nan"] == 0
    for x in (device, host):
        assert x["second_finite"] and x["global_steps"] == 2 - (x is host) and x["moved_after_next"] > 1e-3
        assert x["skipped"] == 1


@pytest.mark.slow
def test_a_pool_smaller_than_the_window_is_refused(runs):
    msg = runs[1]["small_queue_error"]
    assert "train.accum_mode=cached" in msg and "12 keys per rank" in msg and "8 slots" in msg


@pytest.mark.slow
def test_a_cached_run_killed_and_resumed_matches_an_uninterrupted_one(tiny_shards, tmp_path):
    """The training job (2 ranks, dropout on, BatchNorm in training mode) with
    cached accumulation: 2 x 14 x 2 pairs per step, 17 micro-batches per rank
    per epoch, so 8 steps and one micro-batch left out per epoch. 12 steps
    across the epoch boundary, against the same run killed after its step-6
    checkpoint and resumed: the same per-step losses, weights, key towers and
    queues, bit for bit."""
    from conftest import kill_job
    from test_train_job import assert_same_tensors, final_state, losses, run, start, tiny_overrides

    common = {"train.deterministic": "true", "train.ckpt_every_steps": 6, "train.max_steps": 12,
              "train.batch_size": 14, "train.grad_accum": 2, "train.accum_mode": "cached",
              "train.validate_every_epochs": 0}  # validation: covered by the plain resume test
    code, out = run("deepspeed", tiny_overrides(tiny_shards, tmp_path, "full", **common))
    assert code == 0, out[-3000:]
    assert "cached accumulation: the in-batch negatives of each optimiser step are all 56 pairs" in out
    proc = start("torchrun", tiny_overrides(tiny_shards, tmp_path, "cut", **common), env={"USER_DIST_FAULT_KILL": "6"})
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_job(proc, f"train.run_root={tmp_path} ")
    assert proc.returncode != 0 and "kills itself after step 6" in out, out[-3000:]
    code, out = run("deepspeed", tiny_overrides(tiny_shards, tmp_path, "cut", **common, **{"train.resume": "auto"}))
    assert code == 0, out[-3000:]
    assert "at step 6 " in out

    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(full) == sorted(cut) == list(range(1, 13))
    assert [full[s] for s in range(1, 13)] == [cut[s] for s in range(1, 13)]
    meta_a, model_a, mom_a, q_a = final_state(tmp_path / "full")
    meta_b, model_b, mom_b, q_b = final_state(tmp_path / "cut")
    assert (meta_a.step, meta_a.epoch, meta_a.step_in_epoch) == (meta_b.step, meta_b.epoch, meta_b.step_in_epoch) \
        == (12, 1, 4)
    assert meta_a.global_batch == 56
    assert_same_tensors(model_a, model_b, "online towers")
    assert_same_tensors(mom_a, mom_b, "momentum towers")
    for r in (0, 1):
        assert_same_tensors(q_a[r], q_b[r], f"queue shard of rank {r}")
