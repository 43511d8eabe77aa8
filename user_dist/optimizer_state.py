"""What the optimiser holds per rank, and what frozen towers save of it.

AdamW keeps two fp32 moments per trained parameter (8 bytes). ZeRO 1-2 add
an fp32 master copy (4 bytes; DeepSpeed keeps one even for fp32
parameters) and split all of it over the ranks. Gradients take 4 bytes per
trained parameter, whole on every rank with ZeRO 0-1 and split with ZeRO 2
(DeepSpeed's reduction buckets aside). A frozen parameter
(``model.image.freeze``, ``model.text.freeze``) is in no optimiser group
and gets no gradient: none of this.

    python -m user_dist.optimizer_state [--config X.yaml] [--world-size N] [key=value ...]

prints the table for the config's towers with nothing, the image backbone,
the text encoder or both frozen (the towers are built on the CPU, random
init: seconds for ViT-B-32 + BERT-base).
"""
from __future__ import annotations

import argparse
from typing import Dict, Tuple

import torch

ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # ZeRO 1-2: the fp32 master partition
GRAD_BYTES = 4


def count_params(model: torch.nn.Module) -> Tuple[int, int]:
    """(trained, frozen) parameter counts of a RetrievalModel, the online
    CLIP (never trained, whatever the freeze keys) left out; a shared tensor
    counts once."""
    clip = getattr(model, "clip", None)
    seen = {id(p) for p in clip.parameters()} if clip is not None else set()
    trained, frozen = 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trained += p.numel()
        else:
            frozen += p.numel()
    return trained, frozen


def state_bytes(trained: int, zero_stage: int, world_size: int) -> int:
    """Optimiser state per rank (Adam moments, and ZeRO 1-2's fp32 master
    partition) for ``trained`` parameters; partition padding left out."""
    if zero_stage == 0:
        return ADAM_BYTES * trained
    return (ADAM_BYTES + MASTER_BYTES) * trained // world_size


def grad_bytes(trained: int, zero_stage: int, world_size: int) -> int:
    """fp32 gradients per rank (ZeRO 2: partitioned; buckets left out)."""
    return GRAD_BYTES * trained // (world_size if zero_stage >= 2 else 1)


def summary(model: torch.nn.Module, zero_stage: int, world_size: int) -> Dict[str, int]:
    """What build_engine logs: parameter counts and state bytes per rank,
    with the bytes freezing saved."""
    trained, frozen = count_params(model)
    now = state_bytes(trained, zero_stage, world_size)
    return {"trained": trained, "frozen": frozen, "state_bytes": now,
            "saved_bytes": state_bytes(trained + frozen, zero_stage, world_size) - now}


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.0f}"


def table(cfg, world_size: int) -> str:
    """Markdown table: parameters, optimiser state and gradients per rank at
    ZeRO 0, 1-2 for each combination of frozen towers of ``cfg``'s model."""
    import dataclasses

    from user_dist.models import build_model

    rows = ["| frozen | trained params | frozen params | optimiser state ZeRO 0 (MiB) | "
            f"ZeRO 1-2, {world_size} ranks (MiB) | gradients ZeRO 0-1 / 2 (MiB) |", "|---|---|---|---|---|---|"]
    base = None
    for label, image, text in (("nothing", False, False), ("image backbone", True, False),
                               ("text encoder", False, True), ("both", True, True)):
        if image and cfg.data.mode != "jpg":
            continue
        m = cfg.model
        model_cfg = dataclasses.replace(m, image=dataclasses.replace(m.image, freeze=image),
                                        text=dataclasses.replace(m.text, freeze=text))
        torch.manual_seed(0)
        trained, frozen = count_params(build_model(model_cfg, cfg.data.mode))
        base = base if base is not None else state_bytes(trained, 0, 1)
        z0, z12 = state_bytes(trained, 0, world_size), state_bytes(trained, 1, world_size)
        saved = f" (-{_mib(base - z0)})" if base > z0 else ""
        rows.append(f"| {label} | {trained / 1e6:.1f}M | {frozen / 1e6:.1f}M | {_mib(z0)}{saved} | {_mib(z12)} | "
                    f"{_mib(grad_bytes(trained, 0, world_size))} / {_mib(grad_bytes(trained, 2, world_size))} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    from user_dist.config import load_config

    p = argparse.ArgumentParser(description="Optimiser state per rank with and without frozen towers.")
    p.add_argument("--config", help="YAML config (default: the schema's: BERT-base, ViT-B-32 in jpg mode)")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, list(args.overrides))
    print(f"data.mode={cfg.data.mode}, image backbone {cfg.model.image.backbone if cfg.data.mode == 'jpg' else '-'}, "
          f"text encoder {cfg.model.text.pretrained_path or 'BERT from the model.text sizes'}")
    print(table(cfg, args.world_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
