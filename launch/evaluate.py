#!/usr/bin/env python
"""The evaluation job: metrics from similarity matrices, checkpoints or a whole run.

    # offline scoring and ensembles: one or more saved (N, C) image x caption matrices (C = 5N, or the
    # sum of the caption counts in caption_counts.npy beside the first matrix, or --caption-counts NPY)
    python launch/evaluate.py --sims A.npy [B.npy ...] --protocol coco1k --json out.json
    # + ECCV Caption / CxC (/ PMRP) on COCO 5K: the split's ids from its shards or the ids.json beside sims.npy
    python launch/evaluate.py --sims sims.npy --protocol coco5k --ids data/coco/shards/regions/test [--pm-dir DIR]
    # one checkpoint (inside RUN/checkpoints/ it is recorded like the watch mode does)
    python launch/evaluate.py --checkpoint runs/NAME/checkpoints/step_00001000 [--out DIR]
    # every complete checkpoint of a run not evaluated yet; --watch keeps following it
    python launch/evaluate.py --run-dir runs/NAME --watch [--poll 60]
    # several ranks encode the split together
    torchrun --nproc_per_node 4 launch/evaluate.py --run-dir runs/NAME --watch
    # the momentum (EMA key) towers, or both sets side by side; pictures from jpg shards in the report
    python launch/evaluate.py --checkpoint CKPT --towers both --images-from data/.../shards/jpg/test

Any ``key=value`` after the options overrides the checkpoint's own config,
e.g. ``eval.protocols=[generic] eval.batch_size=64 eval.save_sims=true``.
For each checkpoint it writes RUN/eval/<tag>/metrics.json and report.html
(and sims.npy, caption_counts.npy and ids.json with eval.save_sims), TensorBoard scalars eval/<protocol>/<metric>
(eval/momentum/<protocol>/<metric> for the momentum towers) at the checkpoint's
step into RUN/tb/eval, RUN/eval/best.json (highest rsum of the first protocol)
and RUN/eval/state.json (what was done, across restarts).
See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from user_dist.atomic import AtomicFile, atomic_json  # noqa: E402
from user_dist.config import load_config  # noqa: E402
from user_dist.evaluation.metrics import (CAPTIONS_PER_IMAGE, PROTOCOL_IMAGES, ProtocolError,  # noqa: E402
                                          check_shape, check_sims, evaluate, i2t_ranks_torch, t2i_ranks_torch)
from user_dist.evaluation.extended import EXTENDED, extended_or_note, save_ids, tensorboard_tag  # noqa: E402
from user_dist.evaluation.report import (TowerScores, format_extended, format_table, shown_images,  # noqa: E402
                                         write_report)

log = logging.getLogger("user_dist.evaluate")

# (step, results) from one checkpoint, results laid out as in metrics.json
# (towers_results); None on ranks other than 0.
Results = Optional[Tuple[int, Dict[str, dict]]]
TOWERS = {"online": ("online",), "momentum": ("momentum",), "both": ("online", "momentum")}
# The checkpoint's own run-time paths mean nothing to the evaluation job (the
# run may have been resumed from a checkpoint pruned since): blank them so
# that validation does not reject the config.
NEUTRAL_OVERRIDES = ["train.resume=''", "train.deepspeed_config=''"]
# Beside sims.npy: the split's (N,) captions per image, which lay out the matrix's C columns.
COUNTS_FILE = "caption_counts.npy"


# --------------------------------------------------------------------------- offline scoring


def load_counts(path: str) -> np.ndarray:
    """(N,) int64 captions per image from a .npy (COUNTS_FILE), never unpickled.

    Raises:
        ProtocolError: naming the file, when it is unreadable or not a 1-D integer array.
    """
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"{path}: cannot read a .npy of caption counts ({exc})") from exc
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise ProtocolError(f"{path}: caption counts must be a 1-D integer array (one count per image), got shape "
                            f"{counts.shape} of {counts.dtype}")
    return counts.astype(np.int64)


def counts_for(paths: Sequence[str], given: Optional[str]) -> Optional[np.ndarray]:
    """The caption counts of saved matrices: ``given`` (--caption-counts), else COUNTS_FILE beside
    the first matrix when there is one, else None (5 per image: matrices saved before the counts were)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(paths[0])), COUNTS_FILE)
    path = given or (beside if os.path.isfile(beside) else None)
    return None if path is None else load_counts(path)


def save_counts(path: str, counts) -> None:
    """(N,) caption counts written atomically as int64 .npy (what --sims reads beside sims.npy)."""
    with AtomicFile(path, "wb") as f:
        np.save(f, np.asarray(counts, dtype=np.int64))


def load_sims(paths: Sequence[str], protocol: str, caption_counts: Optional[np.ndarray] = None) -> np.ndarray:
    """Load saved (N, C) matrices and average them (an ensemble).

    caption_counts: (N,) captions per image laying out the C columns (metrics.evaluate); None: 5 per image.
    Each file is checked alone (shape and counts for the protocol, NaN/inf) so that the
    message names the file. np.load never unpickles (allow_pickle=False).
    Raises:
        ProtocolError: a file does not fit the protocol or the files' shapes differ.
    """
    total, first = None, None
    for path in paths:
        try:
            sims = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"{path}: cannot read a .npy similarity matrix ({exc})") from exc
        if first is not None and sims.shape != first[1]:
            raise ProtocolError(f"{path}: shape {sims.shape} differs from {first[0]}'s {first[1]}; "
                                "matrices of one ensemble must score the same images and captions")
        try:
            check_sims(sims, protocol, source=path, caption_counts=caption_counts)
        except ProtocolError as exc:
            if caption_counts is None and sims.ndim == 2 and sims.shape[1] != CAPTIONS_PER_IMAGE * sims.shape[0]:
                raise ProtocolError(f"{exc} Its caption counts: --caption-counts NPY, or {COUNTS_FILE} beside "
                                    "the matrix (the evaluation job writes it with eval.save_sims).") from None
            raise
        if len(paths) == 1:
            return sims
        total = sims.astype(np.float64) if total is None else total + sims  # float64: exact enough to average
        first = first or (path, sims.shape)
    return total / len(paths)


# --------------------------------------------------------------------------- one checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be evaluated (unreadable, corrupt, vanished, does not fit the model)."""


def read_checkpoint(ckpt_dir: str, overrides: Sequence[str] = (), towers: str = "online") -> Tuple[int, object, dict]:
    """(step from COMPLETE, the run's Config from config.yaml, the fp32 weights) of one checkpoint.

    towers: "online" (model_fp32.pt) or "momentum" (the EMA key towers,
    momentum.pt, with the frozen CLIP they share from model_fp32.pt). The
    weights are read with torch.load(weights_only=True): tensors only, no
    pickled code. Raises CheckpointError whatever is wrong with the files.
    """
    from user_dist import checkpoint

    try:
        with open(os.path.join(ckpt_dir, "COMPLETE")) as f:
            step = int(json.load(f)["step"])
        cfg = load_config(os.path.join(ckpt_dir, "config.yaml"), NEUTRAL_OVERRIDES + list(overrides))
        weights = checkpoint.load_model_weights(ckpt_dir)
        if towers == "momentum":
            shared = {k: v for k, v in weights.items() if k.startswith("clip.")}
            weights = {**checkpoint.load_momentum_weights(ckpt_dir), **shared}
        return step, cfg, weights
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable checkpoint
        raise CheckpointError(f"{ckpt_dir}: {type(exc).__name__}: {exc}") from exc


def towers_results(by_towers: Dict[str, Dict[str, dict]]) -> Dict[str, dict]:
    """{"online": {protocol: metrics}, "momentum": {...}} -> the layout of metrics.json.

    The online towers' protocols stay at the top level (as before --towers
    existed: readers of online results see no change); the momentum towers'
    go under "momentum" (no protocol has that name).
    """
    out = dict(by_towers.get("online", {}))
    if "momentum" in by_towers:
        out["momentum"] = by_towers["momentum"]
    return out


def tower_sets(results: Dict[str, dict]) -> Dict[str, Dict[str, dict]]:
    """The inverse of towers_results: {"online": {protocol: metrics}, "momentum": {...}}, sets present only."""
    online = {k: v for k, v in results.items() if k != "momentum"}
    sets = {"online": online} if online else {}
    if "momentum" in results:
        sets["momentum"] = results["momentum"]
    return sets


def format_results(results: Dict[str, dict]) -> str:
    """The terminal table; with both sets of towers one protocol's two rows sit together."""
    sets = tower_sets(results)
    if list(sets) == ["online"]:
        return format_table(results)
    first = next(iter(sets.values()))
    table = format_table({f"{p} ({name})": m[p] for p in first if p != EXTENDED
                          for name, m in sets.items() if p in m})
    extended = [f"{name} towers\n{format_extended(m[EXTENDED])}" for name, m in sets.items() if EXTENDED in m]
    return "\n\n".join([table, *extended])


class CheckpointEvaluator:
    """Load a checkpoint's towers, encode the test split, score, write the artifacts.

    Called on every rank (the split is encoded by all ranks together); rank 0
    scores and writes out_dir/report.html (and sims.npy with eval.save_sims).
    Only what is read from the checkpoint raises CheckpointError; a missing
    test split or a protocol that does not fit it are errors of the job.

    Args:
        towers: "online", "momentum" or "both" (TOWERS): which sets are scored.
        images_from: a jpg shard folder whose pictures the report shows, matched by image id.
    """

    def __init__(self, shards: Optional[str] = None, overrides: Sequence[str] = (), towers: str = "online",
                 images_from: str = ""):
        load_config(None, overrides)  # a bad override is the user's error for every checkpoint: fail now
        if towers not in TOWERS:
            raise ValueError(f"towers must be one of {', '.join(TOWERS)}, got {towers!r}")
        if images_from:  # a wrong location fails now, not after encoding
            from user_dist.data_format import load_manifest
            from user_dist.sources import check_location, is_manifest_folder

            check_location(images_from, "--images-from")
            if is_manifest_folder(images_from) and not load_manifest(images_from).has("jpg"):
                raise ValueError(f"--images-from {images_from}: not a jpg shard folder (its manifest lists "
                                 f"{', '.join(load_manifest(images_from).members)})")
        self.shards, self.overrides = shards, list(overrides)
        self.towers, self.images_from = TOWERS[towers], images_from

    def load(self, ckpt_dir: str, towers: str = "online"):
        """(step, cfg, model on the CPU in fp32, eval mode) of one checkpoint's online or momentum
        towers, agreed on every rank."""
        from user_dist.models import build_model

        error, loaded = None, None
        try:
            step, cfg, weights = read_checkpoint(ckpt_dir, self.overrides, towers)
            try:
                model = build_model(cfg.model, cfg.data.mode)
                model.load_state_dict(weights)  # strict: every tensor must fit the model of its config
            except Exception as exc:  # noqa: BLE001 - weights that do not fit: this checkpoint is unusable
                raise CheckpointError(f"{ckpt_dir}: {type(exc).__name__}: {exc}") from exc
            loaded = step, cfg, model.eval()
        except CheckpointError as exc:
            error = exc
        if not _all_ranks_ok(error is None):
            raise error or CheckpointError(f"{ckpt_dir}: another rank could not load this checkpoint")
        return loaded

    def __call__(self, ckpt_dir: str, out_dir: str) -> Results:
        import torch

        scored = {}  # towers -> TowerScores, rank 0 only
        ids = None  # the split's ids: read (and written) once for every set of towers
        for towers in self.towers:
            step, cfg, split, device = self._encode(ckpt_dir, towers)
            if split is None:
                continue
            # Scored where the matrix is computed; only the rank vectors come back per protocol.
            sims = split.similarities(device, keep_on_device=True)  # (N, C) float32 on the device
            counts = split.caption_counts  # (N,): image k's captions are the n_k columns after images 0..k-1's
            results = {p: evaluate(sims, p, source=f"test split of {ckpt_dir}", caption_counts=counts)
                       for p in cfg.eval.protocols}
            if ids is None:
                ids = self.split_ids(cfg, out_dir)
            results.update(self.extended(sims, cfg, ids, counts))
            # The report's recall curves need the whole split's ranks: counted here too, not again on the host.
            ranks = (i2t_ranks_torch(sims, counts).cpu().numpy(), t2i_ranks_torch(sims, counts).cpu().numpy())
            scored[towers] = TowerScores(towers, results, sims.cpu().numpy(), ranks)  # once, for the report
            del sims
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not scored:
            return None
        os.makedirs(out_dir, exist_ok=True)
        if cfg.eval.save_sims:
            for towers, s in scored.items():
                name = "sims.npy" if towers == "online" else f"sims_{towers}.npy"
                with AtomicFile(os.path.join(out_dir, name), "wb") as f:
                    np.save(f, s.sims)
            save_counts(os.path.join(out_dir, COUNTS_FILE), split.caption_counts)  # one split: both sets' layout
        self._report(os.path.join(out_dir, "report.html"), f"{os.path.basename(ckpt_dir)} (step {step})",
                     list(scored.values()), split, cfg)
        return step, towers_results({t: s.results for t, s in scored.items()})

    def _encode(self, ckpt_dir: str, towers: str):
        """(step, cfg, EncodedSplit or None on ranks other than 0, device): one set of towers over the split."""
        import torch

        from user_dist import distributed
        from user_dist.data import eval_loader
        from user_dist.evaluation.encode import encode_split
        from user_dist.tokenizer import build_tokenizer

        step, cfg, model = self.load(ckpt_dir, towers)
        device = distributed.device_for(int(os.environ.get("LOCAL_RANK", 0)))
        model.to(device)
        batches = eval_loader(self.split_dir(cfg), cfg.data, build_tokenizer(cfg.model.text), cfg.eval.batch_size,
                              rank=distributed.rank(), world_size=distributed.world_size())
        split = encode_split(model, batches, device)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shape = (split.images.shape[0], split.captions.shape[0])  # (N, C)
        for p in cfg.eval.protocols:  # on every rank, so that all stop together
            check_shape(shape, p, source=f"test split {self.split_dir(cfg)}", caption_counts=split.caption_counts)
        return step, cfg, (split if distributed.rank() == 0 else None), device

    def split_dir(self, cfg) -> str:
        return self.shards or cfg.data.test_shards

    def _report(self, path: str, title: str, scored: List[TowerScores], split, cfg) -> None:
        """report.html: every set of towers scored, with pictures of the images it shows when at hand."""
        from user_dist.evaluation.thumbnails import report_images
        from user_dist.tokenizer import build_tokenizer

        captions = build_tokenizer(cfg.model.text).batch_decode(split.input_ids, skip_special_tokens=True)
        shown = shown_images([s.sims for s in scored], cfg.eval.report_examples)
        images = report_images(self.split_dir(cfg), shown, self.images_from) if shown else None
        first, *more = scored
        write_report(path, title, first.results, first.sims, captions,
                     [f"image #{k}" for k in range(first.sims.shape[0])], images,
                     examples=cfg.eval.report_examples, ranks=first.ranks, towers=first.name, more=more,
                     caption_counts=split.caption_counts)

    def split_ids(self, cfg, out_dir: str):
        """The split's ids when eval.extended or eval.save_sims needs them (else False); with
        eval.save_sims they go to out_dir/ids.json (what --sims --ids needs)."""
        from user_dist.data_format import read_split_ids

        if cfg.eval.extended == "never" and not cfg.eval.save_sims:
            return False
        ids = read_split_ids(self.split_dir(cfg))
        if cfg.eval.save_sims:
            os.makedirs(out_dir, exist_ok=True)
            save_ids(os.path.join(out_dir, "ids.json"), ids)
        return ids

    def extended(self, sims, cfg, ids, caption_counts) -> dict:
        """{EXTENDED: ECCV Caption / CxC / PMRP metrics} per eval.extended, else {} (also for a split
        without 5 captions per image: a note says why)."""
        metrics = None if cfg.eval.extended == "never" or ids is False else \
            extended_or_note(sims, ids, cfg.eval.extended == "always", cfg.eval.pm_dir, caption_counts)
        return {EXTENDED: metrics} if metrics else {}


def _all_ranks_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (so all ranks skip a bad checkpoint together)."""
    from user_dist import distributed

    return bool(distributed.agree([ok], "all"))


# --------------------------------------------------------------------------- the run folder


class RunRecorder:
    """What the job has done for one run, and where its results go (rank 0 writes).

    RUN/eval/state.json  {"evaluated": {tag: {step, rsum}}, "failed": {tag: reason}}
    RUN/eval/<tag>/metrics.json, RUN/eval/best.json, RUN/tb/eval (TensorBoard)

    TensorBoard scalars go to RUN/tb/eval, a child of the training's log
    folder: TensorBoard follows only the newest event file of a folder, so a
    second writer in RUN/tb itself would freeze the live training curves.
    """

    def __init__(self, run_dir: str, writes: bool = True):
        self.run_dir, self.writes = run_dir, writes
        self.eval_dir = os.path.join(run_dir, "eval")
        self.state_path = os.path.join(self.eval_dir, "state.json")
        self.state = {"evaluated": {}, "failed": {}}
        self._writer = None
        if os.path.isfile(self.state_path):
            try:
                with open(self.state_path) as f:
                    self.state = json.load(f)
                assert isinstance(self.state.get("evaluated"), dict) and isinstance(self.state.get("failed"), dict)
            except (ValueError, AssertionError, AttributeError) as exc:
                raise ValueError(f"{self.state_path} is not a valid evaluation state file ({exc}); delete it "
                                   "to evaluate every checkpoint of the run again") from exc

    def out_dir(self, tag: str) -> str:
        return os.path.join(self.eval_dir, tag)

    def is_done(self, tag: str) -> bool:
        return tag in self.state["evaluated"] or tag in self.state["failed"]

    def _save_state(self) -> None:
        os.makedirs(self.eval_dir, exist_ok=True)
        atomic_json(self.state_path, self.state)

    def record(self, tag: str, step: int, results: Dict[str, dict]) -> None:
        """metrics.json, TensorBoard scalars, best.json, then the state (last: a crash re-evaluates)."""
        if not self.writes:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(self.out_dir(tag), exist_ok=True)
        atomic_json(os.path.join(self.out_dir(tag), "metrics.json"), {"tag": tag, "step": step, **results})
        # One writer (one event file) for the job's lifetime: event files are
        # read in name order, and a new writer per checkpoint names its file
        # with a process-wide counter (…9 sorts after …10), so TensorBoard
        # would skip the later files' scalars.
        if self._writer is None:
            self._writer = SummaryWriter(os.path.join(self.run_dir, "tb", "eval"))
        sets = tower_sets(results)
        for towers, by_protocol in sets.items():
            prefix = "eval" if towers == "online" else f"eval/{towers}"  # online: the tags from before --towers
            for protocol, metrics in by_protocol.items():
                for key, value in metrics.items():
                    if key != "folds":
                        name = tensorboard_tag(key, prefix) if protocol == EXTENDED else f"{prefix}/{protocol}/{key}"
                        self._writer.add_scalar(name, value, step)
        self._writer.flush()
        towers, by_protocol = next(iter(sets.items()))  # the first set scored ranks the checkpoints
        protocol = next(iter(by_protocol))
        rsum = by_protocol[protocol]["rsum"]
        best_path = os.path.join(self.eval_dir, "best.json")
        best = None
        if os.path.isfile(best_path):
            with open(best_path) as f:
                best = json.load(f)
        if (best is None or best.get("protocol") != protocol or best.get("towers", "online") != towers
                or rsum > best["rsum"]):
            atomic_json(best_path, {"tag": tag, "step": step, "protocol": protocol, "towers": towers, "rsum": rsum,
                                     "metrics": os.path.join(tag, "metrics.json")})
        self.state["evaluated"][tag] = {"step": step, "rsum": rsum}
        self._save_state()

    def record_failure(self, tag: str, reason: str) -> None:
        if self.writes:
            self.state["failed"][tag] = reason
            self._save_state()


EvaluateFn = Callable[[str, str], Results]


class Watcher:
    """Evaluates each complete checkpoint of a run once, in step order.

    A checkpoint counts only when it is renamed into place with its COMPLETE
    file (user_dist.checkpoint.list_checkpoints), so one being written is
    never touched. A checkpoint that cannot be evaluated (corrupt, deleted by
    pruning meanwhile, weights that do not fit the model) raises
    CheckpointError: it is logged, remembered as failed and skipped (delete
    its entry in RUN/eval/state.json to retry). Any other error would hit
    every checkpoint (a missing test split, a protocol that does not fit it)
    and stops the job instead.
    """

    def __init__(self, run_dir: str, evaluate_fn: EvaluateFn, recorder: Optional[RunRecorder] = None):
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        self.evaluate_fn = evaluate_fn
        self.recorder = recorder or RunRecorder(run_dir)

    def pending(self) -> List[str]:
        from user_dist import checkpoint

        return [d for d in checkpoint.list_checkpoints(self.ckpt_root)
                if not self.recorder.is_done(os.path.basename(d))]

    def poll(self) -> List[str]:
        """Evaluate every pending checkpoint; returns the tags handled (evaluated or failed)."""
        from user_dist import distributed

        handled = []
        for ckpt in distributed.broadcast_object(self.pending()):
            tag = os.path.basename(ckpt)
            started = time.time()
            try:
                out = self.evaluate_fn(ckpt, self.recorder.out_dir(tag))
            except CheckpointError as exc:
                reason = str(exc)
                log.error("checkpoint %s could not be evaluated and is skipped (%s); delete its entry in %s "
                          "to retry", ckpt, reason, self.recorder.state_path)
                self.recorder.record_failure(tag, reason)
            else:
                if out is not None:
                    step, results = out
                    self.recorder.record(tag, step, results)
                    log.info("evaluated %s (step %d) in %.1f s\n%s", tag, step, time.time() - started,
                             format_results(results))
            handled.append(tag)
        return handled

    def watch(self, poll_s: float) -> None:
        log.info("watching %s every %.0f s (Ctrl-C to stop)", self.ckpt_root, poll_s)
        while True:
            self.poll()
            time.sleep(poll_s)


def run_dir_of(ckpt_dir: str) -> Optional[str]:
    """RUN for a checkpoint at RUN/checkpoints/<tag>, else None."""
    parent = os.path.dirname(os.path.abspath(ckpt_dir))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


# --------------------------------------------------------------------------- command line


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Evaluate USER retrieval: coco5k, coco1k (5 folds averaged), f30k, generic.",
        epilog="Overrides (checkpoint modes): key=value applied to the checkpoint's config, "
               "e.g. eval.protocols=[generic] eval.batch_size=64 eval.save_sims=true.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sims", nargs="+", metavar="NPY", help="saved (N, C) image x caption matrices; "
                      "several are averaged (an ensemble). C = 5N, or the sum of the caption counts "
                      f"({COUNTS_FILE} beside the first matrix, or --caption-counts)")
    mode.add_argument("--checkpoint", metavar="PATH", help="one checkpoint folder (with COMPLETE)")
    mode.add_argument("--run-dir", "--run", dest="run", metavar="DIR",
                      help="a run folder: evaluate its checkpoints not evaluated yet (--run is the same option; "
                           "torchrun takes only --run-dir: it reads --run as its own --run-path)")
    p.add_argument("--protocol", choices=list(PROTOCOL_IMAGES), help="with --sims: the protocol")
    p.add_argument("--json", metavar="OUT", help="with --sims: write the metrics to this JSON file")
    p.add_argument("--caption-counts", metavar="NPY", help=f"with --sims: the split's (N,) captions per image "
                   f"(default: {COUNTS_FILE} beside the first matrix when there is one, else 5 per image)")
    p.add_argument("--ids", metavar="PATH", help="with --sims: the split's shard folder or ids.json (written beside "
                   "sims.npy): adds ECCV Caption / CxC metrics on COCO 5K with COCO caption ids")
    p.add_argument("--pm-dir", default="", metavar="DIR", help="with --ids: folder of the plausible-match files "
                   "(pm_image_to_caption.json, pm_caption_to_image.json): adds PMRP")
    p.add_argument("--watch", action="store_true", help="with --run-dir: keep following the run for new checkpoints")
    p.add_argument("--poll", type=float, default=60.0, metavar="S", help="with --watch: seconds between scans")
    p.add_argument("--shards", metavar="DIR", help="test split to encode (default: the config's data.test_shards)")
    p.add_argument("--out", metavar="DIR", help="with --checkpoint outside a run folder: where to write")
    p.add_argument("--towers", choices=list(TOWERS), default="online",
                   help="checkpoint modes: score the online towers (model_fp32.pt, the paper's protocol), the "
                        "momentum (EMA key) towers (momentum.pt), or both side by side")
    p.add_argument("--images-from", metavar="DIR", default="",
                   help="checkpoint modes: a jpg shard folder of the test split; the report shows its pictures "
                        "of the images it lists, matched by image id (jpg test shards are used without it)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.sims and not args.protocol:
        p.error("--sims needs --protocol (coco5k, coco1k, f30k or generic)")
    if not args.sims and (args.protocol or args.json or args.ids or args.pm_dir or args.caption_counts):
        p.error("--protocol, --json, --ids, --pm-dir and --caption-counts go with --sims; for checkpoints set "
                "eval.protocols=[...], eval.extended, eval.pm_dir")
    if args.pm_dir and not args.ids:
        p.error("--pm-dir needs --ids (PMRP is computed with the ECCV Caption / CxC metrics)")
    if args.watch and not args.run:
        p.error("--watch goes with --run-dir DIR")
    if args.sims and (args.overrides or args.shards or args.images_from or args.towers != "online"):
        p.error("--sims takes no shards, --towers, --images-from or key=value overrides")
    if args.checkpoint and not args.out and run_dir_of(args.checkpoint) is None:
        p.error(f"{args.checkpoint} is not inside RUN/checkpoints/: give --out DIR for its results")
    return args


def _score_sims(args) -> int:
    counts = counts_for(args.sims, args.caption_counts)
    sims = load_sims(args.sims, args.protocol, counts)
    results = evaluate(sims, args.protocol, source=args.sims[0] if len(args.sims) == 1 else "averaged matrices",
                       caption_counts=counts)
    extended = extended_or_note(sims, args.ids, True, args.pm_dir, counts) if args.ids else None
    print(format_table({args.protocol: results, **({EXTENDED: extended} if extended else {})}))
    if args.json:
        atomic_json(args.json, {**results, EXTENDED: extended} if extended else results)
    return 0


def _evaluate_checkpoints(args) -> int:
    from user_dist import checkpoint, distributed

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        distributed.init_distributed(use_deepspeed=False)
    main_rank = distributed.is_main()
    evaluator = CheckpointEvaluator(args.shards, args.overrides, args.towers, args.images_from)
    if args.run:
        watcher = Watcher(args.run, evaluator, RunRecorder(args.run, writes=main_rank))
        if args.watch:
            watcher.watch(args.poll)
        done = watcher.poll()
        log.info("%d checkpoint(s) handled; nothing pending in %s", len(done), args.run)
        return 0
    if not checkpoint.is_complete(args.checkpoint):
        raise FileNotFoundError(f"{args.checkpoint} is not a complete checkpoint (no COMPLETE file, or a *.tmp "
                                "folder still being written)")
    run_dir = run_dir_of(args.checkpoint)
    tag = os.path.basename(os.path.abspath(args.checkpoint))
    recorder = RunRecorder(run_dir, writes=main_rank) if run_dir and not args.out else None
    out_dir = args.out or recorder.out_dir(tag)
    out = evaluator(args.checkpoint, out_dir)
    if out is not None:
        step, results = out
        if recorder:
            recorder.record(tag, step, results)
        else:
            atomic_json(os.path.join(out_dir, "metrics.json"), {"tag": tag, "step": step, **results})
        print(format_results(results))
    return 0


def main(argv=None) -> int:
    from user_dist.distributed import strip_local_rank_arg
    from user_dist.monitor import setup_logging

    args = parse_args(strip_local_rank_arg(sys.argv[1:] if argv is None else list(argv)))
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        return _score_sims(args) if args.sims else _evaluate_checkpoints(args)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:  # user-facing: the message says what to do
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
