"""GPO: the generalised pooling operator of VSE-infinity.

Each feature dimension is sorted over the set (regions or tokens) in
descending order, and the sorted values are averaged with weights that
depend only on the set's length: a bidirectional GRU reads the sinusoidal
positional encodings 1..k of a set of length k, a bias-free Linear turns each
step's output (the mean of both directions) into a score, and a softmax with
temperature 0.1 over the k positions gives the weights.

Because the weights depend only on k, they are computed once per forward for
every length 1..L at once (L sequences through the GRU) and gathered per
sample by its length: no host-side lengths, no host sync, no loop over the
batch.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn as nn

# Softmax temperature of the pooling weights (VSE-infinity).
_TEMPERATURE = 0.1


def positional_encoding(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal encodings of positions 0..length-1: (length, dim), sin on
    even and cos on odd channels."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype)


class GPO(nn.Module):
    """Pool a masked set of vectors (B, L, D) into (B, D)."""

    def __init__(self, pe_dim: int = 32, hidden: int = 32):
        super().__init__()
        self.pe_dim = pe_dim
        self.gru = nn.GRU(pe_dim, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1, bias=False)
        # The GRU's inputs depend only on the set length: built once per
        # (length, device, dtype), not at every forward (a dozen small kernels).
        self._inputs: Dict[tuple, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def gru_inputs(self, max_len: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The 2L unpacked GRU sequences (2L, L, pe_dim), the real positions of
        each length (L, L) bool, and where the reverse direction's output of
        position j of length k sits: (L, L, 1) indices into the right-aligned rows."""
        key = (max_len, str(device), dtype)
        if key not in self._inputs:
            with torch.inference_mode(False):  # usable by autograd later, whatever mode builds them
                self._inputs[key] = self._build_inputs(max_len, device, dtype)
        return self._inputs[key]

    def _build_inputs(self, max_len: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        L = max_len
        pe = positional_encoding(L, self.pe_dim, device, dtype)
        pos = torch.arange(L, device=device)
        lengths = pos + 1  # (L,): row r is a set of length r + 1
        valid = pos[None, :] < lengths[:, None]  # (L, L) left-aligned real positions
        left = pe[None].expand(L, -1, -1) * valid[..., None]  # (L, L, pe_dim)
        src = pos[None, :] - (L - lengths)[:, None]  # right-aligned: slot p holds position p - (L - k)
        right = pe[src.clamp(min=0)] * (src >= 0)[..., None]  # (L, L, pe_dim)
        back_idx = (pos[None, :] + (L - lengths)[:, None]) % L  # slot j + L - k of the right-aligned row
        return torch.cat([left, right]), valid, back_idx[..., None]

    # torch.compile cannot trace an RNN: this runs eagerly (cuDNN) between
    # the compiled parts, with one clean graph break instead of a failed trace.
    @torch.compiler.disable
    def weights_by_length(self, max_len: int) -> torch.Tensor:
        """Pooling weights of every set length: (max_len, max_len); row k-1
        holds the weights of a set of length k (zeros after position k).

        The L sequences go through the GRU unpacked, so nothing leaves the
        device (packing wants CPU lengths, and moving them is a host sync on a
        GPU): the forward direction reads sequence k left-aligned, where it
        sees only positions 0..j at step j; the reverse direction reads it
        right-aligned, where it starts at position k-1 from a zero state, as
        on the unpadded sequence. Both are one GRU call over 2L sequences.
        """
        param = self.score.weight
        L = max_len
        seqs, valid, back_idx = self.gru_inputs(L, param.device, param.dtype)
        # The GRU is tiny: keep it in its own (fp32) precision under autocast,
        # or every call would cast the weights into a new, non-contiguous set
        # that cuDNN must compact again.
        with torch.autocast(param.device.type, enabled=False):
            out = self.gru(seqs)[0]  # (2L, L, 2 hidden)
        half = out.shape[-1] // 2
        fwd = out[:L, :, :half]
        bwd = out[L:, :, half:].gather(1, back_idx.expand(-1, -1, half))
        scores = self.score((fwd + bwd) / 2).squeeze(-1).masked_fill(~valid, float("-inf"))  # (L, L)
        return torch.softmax(scores / _TEMPERATURE, dim=-1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features (B, L, D), mask (B, L) bool True = real -> pooled (B, D).

        Padding may sit anywhere (sorting ignores order); a set with no real
        element pools to zeros.
        """
        B, L, _ = features.shape
        lengths = mask.sum(1)  # (B,) on device
        table = self.weights_by_length(L)  # (L, L)
        weights = table[(lengths - 1).clamp(min=0)]  # (B, L)
        # Padding sorts last, then is zeroed; real values keep their gradient.
        x = features.masked_fill(~mask[..., None], float("-inf"))
        x = x.sort(dim=1, descending=True).values  # (B, L, D)
        first_k = torch.arange(L, device=features.device)[None, :] < lengths[:, None]  # (B, L)
        x = x.masked_fill(~first_k[..., None], 0.0)
        return (x * weights[..., None].to(x.dtype)).sum(1)
