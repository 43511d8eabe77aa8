"""What every section of the benchmark shares: presets, synthetic batches,
device syncs and peak memory."""
from __future__ import annotations

import os
import resource
from typing import Dict, Sequence

import torch

from user_dist.config import Config, load_config

from . import ROOT

# tiny: the model of configs/synthetic.yaml; paper: the schema defaults
# (BERT-base random init, 36 x 2048 regions, embed 1024, batch 128, queue 4096, bf16).
PRESETS = {"tiny": os.path.join(ROOT, "configs", "synthetic.yaml"), "paper": None}


def build_config(preset: str, overrides: Sequence[str] = (), precision: str = "", batch: int = 0) -> Config:
    """The preset's config with --precision/--batch and key=value overrides applied."""
    extra = ["data.mode=regions"]
    if precision:
        extra.append(f"train.precision={precision}")
    if batch:
        extra.append(f"train.batch_size={batch}")
    return load_config(PRESETS[preset], extra + list(overrides))


def caption_lengths(spec: str) -> range:
    """'12-20' -> range(12, 21): token counts (with [CLS] and [SEP]) drawn uniformly."""
    try:
        lo, hi = (int(x) for x in spec.split("-"))
    except ValueError:
        raise SystemExit(f"--caption-len '{spec}': expected MIN-MAX, e.g. 12-20") from None
    if not 2 <= lo <= hi:
        raise SystemExit(f"--caption-len '{spec}': need 2 <= MIN <= MAX")
    return range(lo, hi + 1)


def synthetic_batch(cfg: Config, batch: int, regions: int, lengths: range, seed: int) -> Dict[str, torch.Tensor]:
    """A training batch as the loader yields it (CPU tensors, docs/architecture.md):
    regions (B, R, F) float16 all real, captions of random lengths in ``lengths``
    padded to the batch's longest, unique image ids."""
    g = torch.Generator().manual_seed(seed)
    n_tok = torch.randint(lengths.start, lengths.stop, (batch,), generator=g)
    L = int(n_tok.max())
    attention = (torch.arange(L)[None] < n_tok[:, None]).long()  # (B, L)
    vocab = cfg.model.text.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, L), generator=g) * attention  # no special tokens
    ids[:, 0] = 101  # [CLS]
    ids[torch.arange(batch), n_tok - 1] = 102  # [SEP]
    # float16 regions, as the loader hands over the shards' features (the step converts on the device).
    return {"regions": torch.relu(torch.randn(batch, regions, cfg.model.region_dim, generator=g)).half(),
            "region_mask": torch.ones(batch, regions, dtype=torch.bool),
            "input_ids": ids, "attention_mask": attention,
            "image_ids": torch.arange(seed * batch, (seed + 1) * batch)}


def as_loaded(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The batch as the train loader hands it over: in pinned host memory when
    CUDA is there (DataLoader(pin_memory=True)), so the step's copies to the
    device are asynchronous as in launch/train.py."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.pin_memory() for k, v in batch.items()}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated on a GPU; the process's max resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
