"""Analytic FLOP count of one training sample, for MFU.

Convention (the one of /work/shared/gpu/bench_reference.py and of most MFU
figures): 2 FLOPs per multiply-add of the matrix products (linear layers,
attention, GRU gates, similarity matrices); elementwise work, norms,
softmax and sorting are left out. One training sample costs

    train = 3 x forward(online towers)      forward + backward ("backward = 2 x forward")
          + 1 x forward(momentum towers)    the same model, no gradient
          + 3 x loss                         similarities forward + backward

``exact_train`` counts the backward as autograd runs it instead: a product
whose input needs no gradient (raw region features, queue keys) only
computes its weight gradient (1 x forward, not 2 x). The convention
overcounts by the difference; both are reported.

Shapes: B samples per rank, W ranks, L padded caption length (the encoder
computes on padding too), R regions per image, P queue pool (all ranks).
The GPO pooling weights come from a BiGRU run once per forward over every
length 1..L (not per sample): its cost is divided by B.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from user_dist.config import ModelConfig


@dataclass(frozen=True)
class StepShape:
    """The sizes of one training micro-step that the FLOPs depend on."""

    batch: int  # B, samples per rank
    text_len: int  # L, padded caption length
    regions: int  # R, region slots per image
    pool: int  # P, queue entries of each modality over all ranks (0: no queue term)
    world: int = 1  # W, ranks (the in-batch negatives are the global batch W*B)


@dataclass(frozen=True)
class Part:
    """Forward FLOPs per sample of one product, and its backward factor."""

    forward: float
    # Backward FLOPs = backward_factor x forward: 2 when the input needs a
    # gradient too, 1 when only the weight (or only the other operand) does.
    backward_factor: int = 2


def _gpo(length: int, cfg: ModelConfig, batch: int) -> Dict[str, Part]:
    """The pooling-weight table of GPO (user_dist.models.gpo): a BiGRU over
    2 x length unpacked sequences of length steps (every set length 1..length
    left-aligned for the forward direction and right-aligned for the reverse
    one; both directions run on all of them, 3 gates each), and the score
    Linear on the (length, length, hidden) output. Run once per forward:
    divided by B."""
    steps = 2 * (2 * length) * length  # both directions over 2 length sequences of length steps
    pe, h = cfg.gpo_pe_dim, cfg.gpo_hidden
    return {
        # The positional encodings need no gradient: weight gradient only.
        "gpo_gru_input": Part(2 * steps * 3 * pe * h / batch, 1),
        # The recurrent state does (except the zero initial state: a few
        # steps' worth that this count treats as needing one).
        "gpo_gru_hidden": Part(2 * steps * 3 * h * h / batch),
        "gpo_score": Part(2 * length * length * h / batch),
    }


def text_forward(cfg: ModelConfig, shape: StepShape) -> Dict[str, Part]:
    """Text tower: BERT encoder (no pooler) -> Linear(H, E) [-> CGE] -> GPO."""
    t, L, E = cfg.text, shape.text_len, cfg.embed_size
    H, I, n = t.hidden_size, t.intermediate_size, t.num_layers
    parts = {
        # Q, K, V, output projections and the two FFN matrices, per token.
        "text_encoder_dense": Part(2 * n * L * (4 * H * H + 2 * H * I)),
        # Q K^T and attention x V: L x L x H each, per layer.
        "text_encoder_attention": Part(2 * n * 2 * L * L * H),
        "text_linear": Part(2 * L * H * E),
    }
    if cfg.gse.kind in ("cge", "both") and cfg.gse.clip_text_guide:
        # The CLIP features pass a BatchNorm with learnt scale first: its output needs a gradient.
        parts["text_cge_guide"] = Part(2 * (cfg.gse.clip_dim * E + E * E))
        parts["text_cge_enhance"] = Part(2 * L * E)
    parts.update({f"text_{k}": v for k, v in _gpo(L, cfg, shape.batch).items()})
    return parts


def image_forward(cfg: ModelConfig, shape: StepShape) -> Dict[str, Part]:
    """Region tower: [SGE] -> Linear + MLP projection [-> CGE] -> GPO."""
    R, D, E, Hm = shape.regions, cfg.region_dim, cfg.embed_size, cfg.mlp_hidden
    parts = {}
    sge = cfg.gse.kind in ("sge", "both")
    if sge:
        parts.update({
            # W_l v_i and W_g g0 act on raw features: weight gradient only.
            "image_sge_local": Part(2 * R * D * D, 1),
            "image_sge_global": Part(2 * D * D, 1),
            "image_sge_common": Part(2 * R * D),  # W_c (l_i * g)
            # sum_i w_i v_i and <g_hat, v_i>: the raw v_i need no gradient.
            "image_sge_attend": Part(2 * 2 * R * D, 1),
        })
    # After SGE the regions carry a gradient (through g_hat); raw ones do not.
    first = 2 if sge else 1
    parts["image_projection"] = Part(2 * R * (D * E + D * Hm), first)
    parts["image_mlp_out"] = Part(2 * R * Hm * E)
    if cfg.gse.kind in ("cge", "both"):
        parts["image_cge_guide"] = Part(2 * (cfg.gse.clip_dim * E + E * E))
        parts["image_cge_enhance"] = Part(2 * R * E)
    parts.update({f"image_{k}": v for k, v in _gpo(R, cfg, shape.batch).items()})
    return parts


def loss_forward(embed_size: int, shape: StepShape) -> Dict[str, Part]:
    """UTO's similarities (user_dist.loss): image->text and text->image
    against the global batch (two products, both operands with gradient),
    and each query against the pool of the other modality (keys constant)."""
    E = embed_size
    return {
        "loss_in_batch": Part(2 * 2 * shape.world * shape.batch * E),
        "loss_queue": Part(2 * 2 * shape.pool * E, 1),
    }


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per training sample (and the pieces they come from)."""

    parts: Dict[str, Part]
    text_fwd: float
    image_fwd: float
    loss_fwd: float

    @property
    def forward(self) -> float:
        """One forward of both towers (no loss)."""
        return self.text_fwd + self.image_fwd

    @property
    def train(self) -> float:
        """3 x online forward + momentum forward + 3 x loss (the MFU convention)."""
        return 4 * self.forward + 3 * self.loss_fwd

    @property
    def exact_train(self) -> float:
        """The same with each backward as autograd computes it."""
        return sum(p.forward * (1 + p.backward_factor) for p in self.parts.values()) + self.forward

    def per_step(self, batch: int) -> float:
        return self.train * batch


def count(cfg: ModelConfig, shape: StepShape) -> FlopCount:
    """FLOPs of one training sample of a regions-mode model.

    Args:
        cfg: the model config (tower sizes, GSE kind).
        shape: batch, padded caption length, regions, pool and world size.
    """
    text, image = text_forward(cfg, shape), image_forward(cfg, shape)
    loss = loss_forward(cfg.embed_size, shape)
    if not shape.pool:
        del loss["loss_queue"]
    total = lambda parts: sum(p.forward for p in parts.values())  # noqa: E731
    return FlopCount({**text, **image, **loss}, total(text), total(image), total(loss))
