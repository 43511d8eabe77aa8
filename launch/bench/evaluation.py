"""Benchmark of the evaluation job: scoring time and encoding throughput
(``--sections eval`` of launch/benchmark.py, and launch/bench_eval.py).

    python launch/bench_eval.py                    # scoring + tiny towers
    python launch/bench_eval.py --paper            # + the paper-size towers (BERT-base, 36x2048 regions)
    python launch/bench_eval.py --skip-encoding    # scoring only (no model needed)
    python launch/bench_eval.py --skip-encoding --scoring-device cuda   # scoring a tensor on the GPU
    python launch/bench_eval.py --coco5k --batch 128   # the whole COCO 5K evaluation, paper towers

Scoring: seconds to score a random 5,000 x 25,000 matrix (the COCO 5K test
split) with each protocol that fits it (coco5k, coco1k, generic; f30k on a
1,000 x 5,000 one), best of --repeat runs: a numpy array on the host (one
thread with OMP_NUM_THREADS=1), or with --scoring-device a tensor there.
Encoding: images/s and captions/s of encode_image / encode_text with random
init on random region features and token ids (regions mode), with the
precision the job uses (bf16 on CUDA, fp32 on CPU).
COCO 5K (--coco5k): seconds for what the evaluation job does with a checkpoint,
with its own code, on the default device: encode 5,000 images and 25,000
captions, the similarity matrix, then evaluate() coco5k and coco1k on the
device. Figures go to docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

import numpy as np

from user_dist.evaluation.metrics import evaluate

TINY = ["model.embed_size=64", "model.region_dim=64", "model.mlp_hidden=32", "model.gpo_pe_dim=16",
        "model.gpo_hidden=16", "model.text.hidden_size=64", "model.text.num_layers=2", "model.text.num_heads=2",
        "model.text.intermediate_size=128"]


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_scoring(repeat: int, device=None) -> list:
    """[(protocol, matrix, best seconds)] for random float32 matrices.

    device: None scores numpy arrays on the host; a torch device (or its name)
    scores tensors there (evaluate() returns after the ranks reach the host).
    """
    rng = np.random.default_rng(0)
    big = rng.standard_normal((5000, 25000), dtype=np.float32)
    small = rng.standard_normal((1000, 5000), dtype=np.float32)
    if device is not None:
        import torch

        big, small = torch.from_numpy(big).to(device), torch.from_numpy(small).to(device)
        evaluate(small, "f30k")  # warm-up: the device's kernels are loaded on first use
    rows = [(p, "5000 x 25000", best_of(lambda p=p: evaluate(big, p), repeat)) for p in ("coco5k", "coco1k", "generic")]
    rows.append(("f30k", "1000 x 5000", best_of(lambda: evaluate(small, "f30k"), repeat)))
    rows.append(("coco5k+coco1k", "5000 x 25000", best_of(lambda: [evaluate(big, p) for p in ("coco5k", "coco1k")],
                                                           repeat)))
    return rows


def bench_encoding(name: str, overrides: list, batch: int, batches: int, text_len: int) -> tuple:
    import torch

    from user_dist.config import load_config
    from user_dist.distributed import device_for
    from user_dist.models import build_model

    cfg = load_config(None, overrides)
    device = device_for(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg.model, "regions").to(device).eval()
    g = torch.Generator().manual_seed(0)
    data = {"regions": torch.randn(batch, 36, cfg.model.region_dim, generator=g).to(device),
            "region_mask": torch.ones(batch, 36, dtype=torch.bool, device=device),
            "input_ids": torch.randint(1000, cfg.model.text.vocab_size, (5 * batch, text_len), generator=g).to(device),
            "attention_mask": torch.ones(5 * batch, text_len, dtype=torch.long, device=device)}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run(fn) -> float:
        with torch.no_grad(), autocast:
            fn(data)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(batches):
                fn(data)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - start

    img_s = batches * batch / run(model.encode_image)
    cap_s = batches * 5 * batch / run(model.encode_text)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return name, str(device), f"{params:.1f}M", batch, img_s, cap_s


def bench_coco5k(overrides: list, batch: int, text_len: int, device=None, n_images: int = 5000) -> dict:
    """Seconds of the COCO 5K evaluation with the job's own code, on ``device`` (default: CUDA if any).

    Random-init towers of ``load_config(None, overrides)`` (the paper model by
    default), regions mode: n_images x 36 x region_dim random regions and
    5 n_images captions of text_len random tokens, generated on the device
    first. Encoded in batches of ``batch`` images / 5 ``batch`` captions under
    the job's precision (encode.autocast_for: bf16 on CUDA, fp32 on CPU), each
    batch's embeddings moved to the host as encode_split does; then
    EncodedSplit.similarities kept on the device and evaluate() there. One
    warm-up batch through each tower and one small evaluate() come first.
    coco5k and coco1k need exactly 5,000 images: for another n_images the
    matrix is scored once with 'generic' (``score_coco5k``) and
    ``score_coco1k`` is None; ``scored_as`` says which.
    """
    import torch

    from user_dist.config import load_config
    from user_dist.distributed import device_for
    from user_dist.evaluation.encode import EncodedSplit, autocast_for
    from user_dist.models import build_model

    cfg = load_config(None, overrides)
    device = torch.device(device) if device is not None else device_for(0)
    model = build_model(cfg.model, "regions").to(device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    regions = torch.randn(n_images, 36, cfg.model.region_dim, generator=g, device=device)
    input_ids = torch.randint(1000, cfg.model.text.vocab_size, (5 * n_images, text_len), generator=g, device=device)
    region_mask = torch.ones(batch, 36, dtype=torch.bool, device=device)
    attention_mask = torch.ones(5 * batch, text_len, dtype=torch.long, device=device)

    def image_batch(lo: int) -> dict:
        hi = min(lo + batch, n_images)
        return {"regions": regions[lo:hi], "region_mask": region_mask[:hi - lo]}

    def caption_batch(lo: int) -> dict:
        hi = min(lo + 5 * batch, 5 * n_images)
        return {"input_ids": input_ids[lo:hi], "attention_mask": attention_mask[:hi - lo]}

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    protocols = ("coco5k", "coco1k") if n_images == 5000 else ("generic",)
    ids = input_ids.cpu()  # EncodedSplit's tokens, for the report only
    five = torch.full((n_images,), 5, dtype=torch.int64)  # EncodedSplit's caption counts
    with torch.no_grad():
        with autocast_for(device):  # warm-up: one batch through each tower, then a small matrix scored
            img = model.encode_image(image_batch(0)).float().cpu()
            cap = model.encode_text(caption_batch(0)).float().cpu()
        k = min(img.shape[0], cap.shape[0] // 5)
        evaluate(EncodedSplit(img[:k], cap[:5 * k], ids[:5 * k], five[:k]).similarities(device, keep_on_device=True),
                 "generic")
        t0 = clock()
        with autocast_for(device):  # as encode_split: each batch's embeddings go to the host in float32
            images = torch.cat([model.encode_image(image_batch(lo)).float().cpu()
                                for lo in range(0, n_images, batch)])  # (N, E)
            t1 = clock()
            captions = torch.cat([model.encode_text(caption_batch(lo)).float().cpu()
                                  for lo in range(0, 5 * n_images, 5 * batch)])  # (5N, E)
            t2 = clock()
        sims = EncodedSplit(images, captions, ids, five).similarities(device, keep_on_device=True)  # (N, 5N)
        t3 = clock()
    scores = []
    for protocol in protocols:
        start = clock()
        evaluate(sims, protocol)
        scores.append(clock() - start)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
           "n_images": n_images, "batch": batch, "text_len": text_len,
           "scored_as": " + ".join(protocols) if n_images == 5000 else
           f"generic ({n_images} images; coco5k/coco1k need 5000)",
           "encode_images": t1 - t0, "encode_captions": t2 - t1, "similarities": t3 - t2,
           "score_coco5k": scores[0], "score_coco1k": scores[1] if len(scores) > 1 else None}
    out["total"] = sum(out[k] or 0.0 for k in ("encode_images", "encode_captions", "similarities",
                                                "score_coco5k", "score_coco1k"))
    return out


def eval_section(preset: str, overrides: Sequence[str], args) -> dict:
    """``--sections eval``: :func:`bench_coco5k` with the preset's towers
    (the tiny preset: :data:`TINY`), and its table."""
    r = bench_coco5k((TINY if preset == "tiny" else []) + list(overrides), args.eval_batch, 32,
                     n_images=args.eval_images)
    print(f"\n== evaluation, {r['n_images']:,} images x {5 * r['n_images']:,} captions, {preset} towers, on "
          f"{r['device']} (scored as {r['scored_as']}) ==")
    print("| encode images (s) | encode captions (s) | similarities (s) | score coco5k (s) | score coco1k (s) | "
          "total (s) |\n|---|---|---|---|---|---|")
    coco1k = "-" if r["score_coco1k"] is None else f"{r['score_coco1k']:.3f}"
    print(f"| {r['encode_images']:.3f} | {r['encode_captions']:.3f} | {r['similarities']:.3f} | "
          f"{r['score_coco5k']:.3f} | {coco1k} | {r['total']:.3f} |")
    print(f"(batches of {args.eval_batch} images / {5 * args.eval_batch} captions of 32 tokens, random init; "
          "the job's precision: bf16 on CUDA, fp32 on a CPU)")
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Benchmark scoring and encoding of the evaluation job.")
    p.add_argument("--repeat", type=int, default=3, help="scoring runs; the best is reported")
    p.add_argument("--threads", type=int, default=1, help="torch/BLAS threads for encoding")
    p.add_argument("--paper", action="store_true", help="also time the paper-size towers (slow on a CPU)")
    p.add_argument("--skip-encoding", action="store_true", help="scoring only")
    p.add_argument("--batch", type=int, default=32, help="images per encoding batch (5x captions)")
    p.add_argument("--batches", type=int, default=3, help="timed encoding batches")
    p.add_argument("--scoring-device", metavar="DEV", help="score torch tensors on DEV (cpu, cuda) instead of "
                   "numpy arrays")
    p.add_argument("--coco5k", action="store_true", help="only the whole COCO 5K evaluation (encode + score) "
                   "on the default device, paper towers unless --tiny")
    p.add_argument("--tiny", action="store_true", help="with --coco5k: the tiny towers")
    p.add_argument("--n-images", type=int, default=5000, help="with --coco5k: images (5 captions each); "
                   "other than 5000 is scored as 'generic'")
    p.add_argument("--text-len", type=int, default=32, help="tokens per caption")
    args = p.parse_args(argv)

    if args.coco5k:
        import torch

        torch.set_num_threads(args.threads)
        r = bench_coco5k(TINY if args.tiny else [], args.batch, args.text_len, n_images=args.n_images)
        print(f"COCO 5K evaluation on {r['device']}: {r['n_images']} images, {5 * r['n_images']} captions of "
              f"{r['text_len']} tokens, batches of {r['batch']} images; scored as {r['scored_as']}")
        for key in ("encode_images", "encode_captions", "similarities", "score_coco5k", "score_coco1k", "total"):
            print(f"{key:>16}  " + ("       -" if r[key] is None else f"{r[key]:8.3f}"))
        return 0
    where = f"torch on {args.scoring_device}" if args.scoring_device else "numpy"
    print(f"scoring (exact ranks, pessimistic ties; {where})")
    print(f"{'protocol':>14}  {'matrix':>12}  {'seconds':>8}")
    for protocol, shape, seconds in bench_scoring(args.repeat, args.scoring_device):
        print(f"{protocol:>14}  {shape:>12}  {seconds:8.3f}")
    if args.skip_encoding:
        return 0
    import torch

    torch.set_num_threads(args.threads)
    towers = [("tiny", TINY)] + ([("paper", [])] if args.paper else [])
    print(f"\nencoding (random init, regions 36 x region_dim, captions of {args.text_len} tokens)")
    print(f"{'towers':>8}  {'device':>8}  {'params':>8}  {'batch':>5}  {'images/s':>10}  {'captions/s':>10}")
    for name, overrides in towers:
        name, device, params, batch, img_s, cap_s = bench_encoding(name, overrides, args.batch, args.batches,
                                                                    args.text_len)
        print(f"{name:>8}  {device:>8}  {params:>8}  {batch:>5}  {img_s:10.1f}  {cap_s:10.1f}")
    return 0

