"""Caption augmentation of the reference method (method.md), on word pieces.

Each word of a caption is picked with probability ``prob``; a picked word is
replaced by [MASK] pieces with probability 0.5, by random tokens with
probability 0.1, and deleted otherwise (0.4). A word split into several word
pieces is treated as a whole, like the reference (which draws once per
basic-tokenizer word). Randomness comes from the caller's generator, so a
seeded stream gives the same augmented batch every time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, List, Sequence

import numpy as np

MASK_SHARE = 0.5    # of the picked words: become [MASK]
RANDOM_SHARE = 0.1  # of the picked words: become random tokens; the rest are deleted


@dataclass(frozen=True)
class CaptionAugment:
    """Augments one caption given as words, each a list of word-piece ids.

    Args:
        prob: probability that a word is picked (method.md: 0.2).
        mask_id: id of the [MASK] token.
        vocab_size: random tokens are drawn from [0, vocab_size) ...
        special_ids: ... except these ([CLS], [SEP], [PAD], [MASK], [UNK]).
    """

    prob: float
    mask_id: int
    vocab_size: int
    special_ids: FrozenSet[int]

    def __call__(self, words: Sequence[Sequence[int]], rng: np.random.Generator) -> List[int]:
        """words: the caption's words (piece ids, no special tokens) -> augmented piece ids."""
        out: List[int] = []
        picks = rng.random(len(words))
        for pieces, u in zip(words, picks):
            if u >= self.prob:
                out.extend(pieces)
                continue
            v = u / self.prob  # uniform in [0, 1) again, given that the word was picked
            if v < MASK_SHARE:
                out.extend([self.mask_id] * len(pieces))
            elif v < MASK_SHARE + RANDOM_SHARE:
                out.extend(self.random_token(rng) for _ in pieces)
            # else: deleted
        return out

    def random_token(self, rng: np.random.Generator) -> int:
        while True:
            token = int(rng.integers(self.vocab_size))
            if token not in self.special_ids:
                return token
