"""The ``project`` section: samples/s per GPU at larger world sizes, from a
compute time per step and the bytes the code declares (:func:`bench.comm.declared`)."""
from __future__ import annotations

from typing import Dict, List, Sequence

from user_dist.config import Config

from .comm import declared, ring_wire_bytes, sync_norm_widths


def project(cfg: Config, compute_ms: float, worlds: Sequence[int], gpus_per_node: int, nic_gbit_per_node: float,
            nvlink_gbyte: float) -> List[Dict[str, float]]:
    """Per-GPU samples/s at each world size W.

    Model (stated in docs/performance.md): collectives are blocking and not
    overlapped with compute (ZeRO 0 all-reduces after the backward; the
    feature gathers sit on the loss's critical path); hierarchical ring
    algorithms: inside a node of ``gpus_per_node`` at ``nvlink_gbyte`` GB/s
    per GPU, across nodes through the node's NICs (``nic_gbit_per_node``
    Gb/s in all), each node moving its share once for its GPUs. On a ring of
    k members an all-reduce of n bytes moves 2 (k-1)/k n, every other
    collective (k-1)/k n of its payload.
    """
    from user_dist.models import build_model

    model = build_model(cfg.model, cfg.data.mode)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    norms = sync_norm_widths(model)
    rows = []
    for W in worlds:
        parts = [(c.kind, c.nbytes) for c in declared(cfg, W, n_params, norms)]
        g = min(W, gpus_per_node)
        nodes = max(1, W // gpus_per_node)
        intra = ring_wire_bytes(parts, g) / (nvlink_gbyte * 1e9)
        inter = ring_wire_bytes(parts, nodes) / (nic_gbit_per_node / 8 * 1e9)
        comm_ms = 1e3 * (intra + inter)
        rows.append({"world": W, "nodes": nodes, "payload_mb": sum(n for _, n in parts) / 1e6, "comm_ms": comm_ms,
                     "step_ms": compute_ms + comm_ms,
                     "samples_per_s_per_gpu": cfg.train.batch_size / ((compute_ms + comm_ms) / 1e3),
                     "efficiency": compute_ms / (compute_ms + comm_ms)})
    return rows


def print_projection(rows: List[Dict[str, float]], compute_ms: float, args) -> None:
    print(f"\n== projection: compute {compute_ms:.1f} ms/step, {args.gpus_per_node} GPUs/node, NVLink "
          f"{args.nvlink_gbyte:g} GB/s per GPU, {args.nic_gbit:g} Gb/s per node across nodes ==")
    print("| GPUs | nodes | payload MB/step/rank | comm ms | step ms | samples/s per GPU | scaling efficiency |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['nodes']} | {r['payload_mb']:.1f} | {r['comm_ms']:.1f} | {r['step_ms']:.1f} | "
              f"{r['samples_per_s_per_gpu']:,.0f} | {100 * r['efficiency']:.0f}% |")
