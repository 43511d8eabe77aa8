"""Atomic checkpoints that hold everything needed to continue a run exactly.

Layout of one checkpoint (see docs/architecture.md):

    RUN/checkpoints/step_00001000/
        COMPLETE              JSON {step, epoch, ...}; written last
        model_fp32.pt         online towers, fp32, tensors only (the eval job reads this)
        momentum.pt           key towers, fp32, tensors only
        config.yaml           the run's resolved config
        meta.json             CheckpointMeta: step, epoch, step_in_epoch, samples,
                              world_size, global_batch, zero_stage, queue layout, time
        user_state/rank_00000.pt   per rank: queue shard, RNG states, counters, the
                              rank's own buffers (BatchNorm statistics, online and key)
        universal/            only after a ZeRO 1-2 resume on another number of ranks:
                              the engine state in DeepSpeed's universal format
        <deepspeed files>     engine state: module, optimiser, scheduler (client_state unused)

A checkpoint is written under ``step_XXXXXXXX.tmp`` and renamed into place by
rank 0 only after every rank has finished writing and COMPLETE is on disk;
``latest`` is replaced atomically afterwards. A crash or ``kill -9`` at any
point leaves the previous checkpoint and ``latest`` intact; leftover
``*.tmp`` folders are removed by the next save.

Everything we write ourselves loads with ``torch.load(weights_only=True)``:
plain tensors, numbers, strings, lists and dicts. DeepSpeed loads its engine
files (and ds_to_universal converts them) with the full unpickler, so before
any of that rank 0 loads every ``.pt`` file of the checkpoint with torch's
weights-only unpickler, allowing only the few DeepSpeed classes its files
hold (:data:`DEEPSPEED_GLOBALS`): a file that would run other code on
loading is refused (:func:`check_loads_without_code`), unless the user says
the checkpoint is trusted (``train.trust_checkpoint``).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from . import distributed as du
from . import rng
from .atomic import atomic_json, atomic_save, atomic_write, fsync_dir
from .plan import BatchLayout

TAG_PREFIX = "step_"
UNIVERSAL = "universal"  # step_X/universal: the ZeRO state converted for another number of ranks
# The only classes DeepSpeed 0.19's engine files pickle beyond tensors and
# containers (found with torch.serialization.get_unsafe_globals_in_checkpoint
# over ZeRO 0-2, fp32/bf16 and universal checkpoints; the fp16 loss scalers by
# reading its source). Constructing them runs no code of the file's choosing.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
log = logging.getLogger("user_dist")


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def write_pointer(path: str, tag: str) -> None:
    """Point a name (``latest``, ``best``) at a checkpoint tag, atomically."""
    atomic_write(path, tag)


def _torch_save(obj: Any, path: str) -> None:
    atomic_save(path, lambda tmp: torch.save(obj, tmp))


def require_complete(ckpt_dir: str) -> None:
    """Raise FileNotFoundError, saying what to do, unless ``ckpt_dir`` is complete."""
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no COMPLETE file); "
                                "pick another one or use train.resume=auto")


def is_complete(ckpt_dir: str) -> bool:
    """A checkpoint folder is usable only when renamed into place with COMPLETE."""
    return (os.path.isdir(ckpt_dir) and not os.path.basename(ckpt_dir.rstrip("/")).endswith(".tmp")
            and os.path.isfile(os.path.join(ckpt_dir, "COMPLETE")))


def list_checkpoints(ckpt_root: str) -> List[str]:
    """Complete checkpoint folders of a run, oldest first (by step)."""
    if not os.path.isdir(ckpt_root):
        return []
    names = [n for n in os.listdir(ckpt_root) if n.startswith(TAG_PREFIX) and not n.endswith(".tmp")]
    dirs = [os.path.join(ckpt_root, n) for n in sorted(names)]
    return [d for d in dirs if is_complete(d)]


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    """The newest complete checkpoint, by step. Found by a scan, not through
    the ``latest`` pointer (which is for people and tools): a save whose
    folder was renamed into place is complete even if the pointer could not
    be updated after it (a crash, a full disk)."""
    done = list_checkpoints(ckpt_root)
    return done[-1] if done else None


@dataclass(frozen=True)
class CheckpointMeta:
    """``meta.json``: where a run stood and how it was laid out when it saved.

    Written by :func:`save_checkpoint` and read by :meth:`read` only. The
    layout fields tell a resume what it may continue on (the same global
    batch; ZeRO 0 or ZeRO 1-2; the queue's layout).
    """

    step: int  # optimiser steps done
    epoch: int
    step_in_epoch: int
    world_size: int  # ranks that wrote it
    global_batch: int  # ranks x train.batch_size x train.grad_accum
    zero_stage: int  # the stage in force (after any DeepSpeed JSON override)
    queue_size_per_rank: int
    queue_mode: str
    skipped_nonfinite: int = 0
    samples: int = 0  # pairs trained on: step x global_batch
    best_rsum: Optional[float] = None  # best validation rsum so far
    best_tag: str = ""  # the checkpoint that scored it
    data_fingerprint: Optional[Dict[str, Any]] = None  # the data stream's parameters (a change is reported)
    time: float = 0.0  # when it was written (time.time())

    def write(self, ckpt_dir: str) -> None:
        atomic_json(os.path.join(ckpt_dir, "meta.json"), dataclasses.asdict(self))

    @classmethod
    def read(cls, ckpt_dir: str) -> "CheckpointMeta":
        """The meta of a complete checkpoint. Checkpoints older than the
        layout fields get them from their config.yaml (plain YAML, loaded
        safely); keys this version does not know are ignored."""
        with open(os.path.join(ckpt_dir, "meta.json")) as f:
            raw = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        missing = {"global_batch", "zero_stage", "queue_size_per_rank", "queue_mode"} - values.keys()
        if missing:
            values.update({k: v for k, v in _layout_from_config(ckpt_dir, int(raw["world_size"])).items()
                           if k in missing})
        return cls(**values)


def _layout_from_config(ckpt_dir: str, world_size: int) -> Dict[str, Any]:
    """The layout fields of an older checkpoint, from its config.yaml."""
    from omegaconf import OmegaConf  # plain YAML (config.to_yaml), loaded safely

    saved = OmegaConf.load(os.path.join(ckpt_dir, "config.yaml"))
    train, queue = saved.get("train", {}), saved.get("queue", {})
    zero = int(train.get("zero_stage", 0))
    # A DeepSpeed JSON override may have raised the stage: ZeRO 1-2 leave
    # per-rank optimiser partitions behind, whatever the YAML said.
    if zero == 0 and any(n.endswith("optim_states.pt") for n in os.listdir(ckpt_dir)):
        zero = 1
    layout = BatchLayout(world_size, int(train.get("batch_size", 0)), int(train.get("grad_accum", 1)))
    return {"global_batch": layout.global_batch,
            "zero_stage": zero, "queue_size_per_rank": int(queue.get("size_per_rank", 0)),
            "queue_mode": str(queue.get("mode", "replicated"))}


# --------------------------------------------------------------------------- save


def full_fp32_state_dict(engine) -> Dict[str, torch.Tensor]:
    """The online towers' weights in fp32 on CPU, on every rank.

    With fp16 or ZeRO 1-2 the fp32 master weights of the trained parameters
    are (partitioned) in the optimiser; DeepSpeed assembles them (a
    collective: every rank must call this). Frozen parameters
    (``model.*.freeze``) have no master copy: the module's own tensor is
    exported, whole on every rank under ZeRO 1-2 (fp32 unless fp16).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    out = {}
    # state_dict() names exactly what load_state_dict expects: parameters and
    # persistent buffers (not e.g. BERT's non-persistent position_ids).
    for name, value in engine.module.state_dict().items():
        p = params.get(name)
        full = safe_get_full_fp32_param(p) if p is not None and p.requires_grad else None
        t = (full if full is not None else value).detach()
        out[name] = (t.float() if t.is_floating_point() else t).cpu().clone()
    return out


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, most often). The message
    says what was kept and what to do; nothing saved before was touched."""


class ResumeError(RuntimeError):
    """A complete checkpoint that cannot be resumed here as asked: a file
    that would run code when unpickled, or a conversion for another number
    of ranks that failed or would not fit. The message says what to do;
    nothing in the checkpoint was changed."""


def folder_bytes(path: str) -> int:
    """Bytes of the files under ``path``."""
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(base, name))
            except OSError:  # removed meanwhile
                pass
    return total


def estimate_bytes(ckpt_root: str, engine) -> int:
    """What the next checkpoint will take on disk: the newest one's size, or
    before the first, 24 bytes per parameter (DeepSpeed's module and an fp32
    master copy, Adam's two moments, the fp32 export, the momentum towers).
    0 when the folder cannot be read (check_free_space then reports it)."""
    try:
        newest = latest_checkpoint(ckpt_root)
        if newest is not None:  # its universal/ (a resume on other ranks) is not part of a save
            return folder_bytes(newest) - folder_bytes(os.path.join(newest, UNIVERSAL))
    except OSError:
        return 0
    return 24 * sum(p.numel() for p in engine.module.parameters())


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MB"


def check_free_space(ckpt_root: str, tag: str, need: int) -> None:
    """Refuse a save that would not fit, before anything is written, on every
    rank alike (one all-reduce, also when a rank cannot even look). Each rank
    checks the file system it writes to. Raises CheckpointSaveError."""
    need = int(need * 1.05) + 2 ** 20  # headroom: sizes vary a little between saves
    free, error = -1, None
    try:
        free = shutil.disk_usage(ckpt_root).free
    except OSError as exc:  # e.g. a stale network mount: still take part in the all-reduce
        error = exc
    short, failed = du.agree([error is None and free < need, error is not None], "any").tolist()
    if not (short or failed):
        return
    newest = _newest_or_none(ckpt_root)
    if error is not None:
        why = f"its free space could not be read on rank {du.rank()}: {error}"
    elif failed:
        why = "another rank could not read its free space"
    elif free < need:
        why = f"it needs about {_mb(need)}, {_mb(free)} are free here (rank {du.rank()})"
    else:
        why = f"another rank has less than the {_mb(need)} it needs ({_mb(free)} are free here)"
    raise CheckpointSaveError(
        f"not enough free space for checkpoint {tag} under {ckpt_root}: {why}. Nothing was written; the "
        f"newest complete checkpoint is {newest}. Free space (a save holds train.keep_last + 1 "
        "checkpoints until the oldest is pruned; a quota can be lower than the free space shown), then "
        "resume with train.resume=auto")


def _newest_or_none(ckpt_root: str) -> str:
    try:
        return latest_checkpoint(ckpt_root) or "none yet"
    except OSError as exc:
        return f"unknown ({exc})"


def save_checkpoint(run_dir: str, engine, *, meta: CheckpointMeta, config_yaml: str,
                    momentum_state: Dict[str, torch.Tensor], rank_state: Dict[str, Any],
                    keep_last: int, keep_tags: tuple = ()) -> str:
    """Write one checkpoint atomically. Call on every rank.

    Args:
        meta: the run's position and layout (its ``time`` is set here).
        momentum_state: key towers' state_dict (identical on every rank).
        rank_state: this rank's own state (queue shard, counters); RNG added here.
        keep_last: how many step checkpoints to keep (plus ``keep_tags``).
    Returns: the final checkpoint folder.
    Raises:
        CheckpointSaveError: too little free space (checked first, on every
            rank alike), or a write failed (this rank's; the other ranks are
            ended by the launcher when this one exits). Either way the
            checkpoints saved before are untouched, and latest_checkpoint()
            still finds the newest complete one.
    """
    root = os.path.join(run_dir, "checkpoints")
    tag = tag_for(meta.step)
    tmp_tag = tag + ".tmp"
    final = os.path.join(root, tag)
    tmp = os.path.join(root, tmp_tag)
    if du.is_main():
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # left by a crash during an earlier save
            shutil.rmtree(tmp)
    du.barrier()
    check_free_space(root, tag, estimate_bytes(root, engine))
    try:
        try:
            return _write(root, tag, tmp, final, engine, meta, config_yaml, momentum_state, rank_state,
                          keep_last, keep_tags)
        except RuntimeError as exc:
            raise _as_write_error(exc, root) from exc
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(
            f"saving checkpoint {tag} failed on rank {du.rank()}: {exc}. The checkpoints saved before are "
            f"untouched: the newest complete one is {_newest_or_none(root)}; the unfinished {tmp_tag} was "
            f"removed (any rest goes with the next save). Free space under {root} (or raise the quota), then "
            "resume with train.resume=auto") from exc


# torch.save reports a failed write (a full disk) as a RuntimeError from its
# C++ stream writer, not as an OSError.
_WRITE_FAILURES = ("file write failed", "failed writing", "iostream error", "unexpected pos",
                   "Parent directory")  # DeepSpeed logs a failed mkdir and goes on to torch.save


def _as_write_error(exc: RuntimeError, root: str) -> BaseException:
    """``exc`` as an OSError when it is a failed write, else ``exc`` itself."""
    text = str(exc)
    if not any(m in text for m in _WRITE_FAILURES):
        return exc
    full = shutil.disk_usage(root).free < 2 ** 20
    return OSError(errno.ENOSPC if full else errno.EIO,
                   f"{os.strerror(errno.ENOSPC) if full else 'write failed'} ({text.strip().splitlines()[0]})")


def _write(root: str, tag: str, tmp: str, final: str, engine, meta: CheckpointMeta, config_yaml: str,
           momentum_state: Dict[str, torch.Tensor], rank_state: Dict[str, Any], keep_last: int,
           keep_tags: tuple) -> str:
    tmp_tag = os.path.basename(tmp)
    model_fp32 = full_fp32_state_dict(engine)  # collective
    # Our own mkdir first: DeepSpeed only logs a failed one (a quota, a full
    # directory) and fails later with a less telling error.
    os.makedirs(os.path.join(tmp, "user_state"), exist_ok=True)
    engine.save_checkpoint(root, tag=tmp_tag, client_state={}, save_latest=False)
    state = dict(rank_state)
    state["rng"] = rng.state()
    _torch_save(state, os.path.join(tmp, "user_state", f"rank_{du.rank():05d}.pt"))
    if du.is_main():
        _torch_save(model_fp32, os.path.join(tmp, "model_fp32.pt"))
        _torch_save(momentum_state, os.path.join(tmp, "momentum.pt"))
        atomic_write(os.path.join(tmp, "config.yaml"), config_yaml)
        dataclasses.replace(meta, time=time.time()).write(tmp)
    du.barrier()  # every rank's files are on disk
    if du.is_main():
        atomic_json(os.path.join(tmp, "COMPLETE"), {"step": meta.step, "epoch": meta.epoch}, indent=None)
        if os.path.exists(final):  # same step saved twice (e.g. preemption at an epoch end)
            shutil.rmtree(final)
        os.replace(tmp, final)  # from here on the checkpoint is complete and found by latest_checkpoint
        fsync_dir(root)  # and stays so after a power loss
        try:
            write_pointer(os.path.join(root, "latest"), tag)
            prune(root, keep_last, keep_tags)
        except OSError as exc:  # the next save tries again; nothing saved is at risk
            log.error("checkpoint %s is complete, but updating checkpoints/latest or pruning failed: %s", final,
                      exc)
    du.barrier()
    return final


def prune(ckpt_root: str, keep_last: int, keep_tags: tuple = ()) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and keep_tags)."""
    done = list_checkpoints(ckpt_root)
    for d in done[:-keep_last] if keep_last > 0 else done:
        if os.path.basename(d) not in keep_tags:
            shutil.rmtree(d, ignore_errors=True)
    for n in os.listdir(ckpt_root):
        if n.startswith(TAG_PREFIX) and n.endswith(".tmp"):
            # A *.tmp folder at this point is from a crashed save, never ours.
            shutil.rmtree(os.path.join(ckpt_root, n), ignore_errors=True)


# --------------------------------------------------------------------------- load


def load_checkpoint(ckpt_dir: str, engine, *, universal: bool = False,
                    trusted: bool = False) -> Dict[str, torch.Tensor]:
    """Restore the engine from ``ckpt_dir``; return the key towers' state.

    Which ranks' own states (queue, RNG) a job reads is the resume plan's
    business (user_dist.resume): :func:`load_rank_state`,
    :func:`load_queue_states`. ``universal`` (an engine built with
    ``checkpoint.load_universal``): the ZeRO 1-2 engine state is read
    through DeepSpeed's universal format (:func:`to_universal`). Unless
    ``trusted``, every file is first checked to load without running code
    (:func:`check_loads_without_code`; ResumeError otherwise). Collective.

    Returns: the key towers' state_dict.
    """
    require_complete(ckpt_dir)
    if not trusted:
        check_loads_without_code(ckpt_dir)
    root, tag = os.path.split(ckpt_dir.rstrip("/"))
    if universal:
        root, tag = ckpt_dir, os.path.basename(to_universal(ckpt_dir, CheckpointMeta.read(ckpt_dir).world_size))
    path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state from {ckpt_dir}")
    if universal:
        _restore_outside_optimizer(engine.module, load_model_weights(ckpt_dir), ckpt_dir)
    return torch.load(os.path.join(ckpt_dir, "momentum.pt"), map_location="cpu", weights_only=True)


def _restore_outside_optimizer(module: torch.nn.Module, weights: Dict[str, torch.Tensor], ckpt_dir: str) -> None:
    """After a universal load: what DeepSpeed's universal format does not
    carry, from our fp32 export. That format holds the optimiser's
    parameters (and their state) only, and DeepSpeed then skips the module's
    own state: the buffers (BatchNorm statistics) and the frozen parameters
    (``model.*.freeze``) would keep the values of the freshly built model,
    e.g. another weights file. Copied bit for bit (fp32 -> fp32; an fp16
    module's frozen weights were exported from fp16)."""
    frozen = {name: p for name, p in module.named_parameters() if not p.requires_grad}
    targets = {**dict(module.named_buffers()), **frozen}
    missing = sorted(name for name in frozen if name not in weights)
    if missing:
        raise ResumeError(f"{ckpt_dir}/model_fp32.pt holds no {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                          "frozen parameters of this model: was the checkpoint written with another model config? "
                          "Resume with that config, or on the number of ranks that wrote it")
    with torch.no_grad():
        for name, t in targets.items():
            if name in weights:
                t.copy_(weights[name])


def to_universal(ckpt_dir: str, saved_world: int) -> str:
    """``ckpt_dir/universal``: the ZeRO 1-2 engine state in DeepSpeed's universal
    format (optimiser state per parameter, loadable on any number of ranks).

    Converted once, by rank 0 (DeepSpeed's ds_to_universal, in a subprocess),
    into a temporary folder renamed into place when done; the other ranks wait.
    The checkpoint's own files are only read. Collective: every rank raises
    ResumeError when rank 0 could not convert (too little free space, checked
    first, or a failed conversion), and the temporary folder is removed.
    """
    out = os.path.join(ckpt_dir, UNIVERSAL)
    _on_rank0_for_all(lambda: "" if os.path.isdir(out) else _convert_to_universal(ckpt_dir, out, saved_world),
                      f"converting {ckpt_dir} to DeepSpeed's universal format",
                      f"rank 0 could not convert {ckpt_dir} to DeepSpeed's universal format; its log says why")
    return out


def _on_rank0_for_all(check, what: str, others: str) -> None:
    """Run ``check()`` (-> '' or what went wrong) on rank 0 while the other
    ranks wait in one all-reduce; then every rank raises ResumeError (rank 0
    with the message, the others with ``others``) or none does. Any exception
    on rank 0 counts as a failure, so no rank is left waiting."""
    error = ""
    if du.is_main():
        try:
            error = check()
        except Exception as exc:  # anything: the other ranks are waiting in the all-reduce below
            error = f"{what} failed: {exc!r}"
    if du.agree([bool(error)], "any").item():
        raise ResumeError(error or others)


def _deepspeed_classes() -> list:
    import importlib

    found = []
    for dotted in DEEPSPEED_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: its files will not name it either
            pass
    return found


def unsafe_files(ckpt_dir: str) -> List[str]:
    """'file: reason' for every ``.pt`` file under ``ckpt_dir`` (universal/
    included) that torch's weights-only unpickler refuses even with
    :data:`DEEPSPEED_GLOBALS` allowed. Tensors are memory-mapped, not read:
    only the pickled structure is checked."""
    import pickle

    bad = []
    with torch.serialization.safe_globals(_deepspeed_classes()):
        for base, _, files in sorted(os.walk(ckpt_dir)):
            for name in sorted(files):
                if not name.endswith(".pt"):
                    continue
                path = os.path.join(base, name)
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except pickle.UnpicklingError as exc:
                    # torch's message: the refused global first, then advice meant for its own API
                    reason = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "global" in ln),
                                  str(exc).splitlines()[0] if str(exc) else repr(exc))
                    bad.append(f"{path}: {reason.rstrip('.')}")
    return bad


def check_loads_without_code(ckpt_dir: str) -> None:
    """Refuse (ResumeError, on every rank) a checkpoint whose files would run
    code of their own when DeepSpeed unpickles them. Collective; rank 0 reads."""
    def check() -> str:
        bad = unsafe_files(ckpt_dir)
        if not bad:
            return ""
        return (f"{ckpt_dir} holds pickled objects that torch's weights-only loader refuses, so loading it "
                f"could run code: {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}. Resume only from "
                "checkpoints you trust; if you made this one (another DeepSpeed version can pickle other "
                "classes), set train.trust_checkpoint=true")
    _on_rank0_for_all(check, f"checking {ckpt_dir} before loading",
                      f"rank 0 refused to load {ckpt_dir}; its log says why")


def _convert_to_universal(ckpt_dir: str, out: str, saved_world: int) -> str:
    """Rank 0's conversion; returns '' or what went wrong and what to do."""
    import subprocess
    import sys

    advice = (f"Nothing in {ckpt_dir} was changed. Free space and resume again, or resume on the number of "
              f"ranks that wrote it ({saved_world}), which needs no conversion")
    partitions = 0
    for name in os.listdir(ckpt_dir):
        if name.startswith(f"{UNIVERSAL}.tmp."):  # left by a conversion that was killed
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        elif name.endswith("optim_states.pt"):
            partitions += os.path.getsize(os.path.join(ckpt_dir, name))
    # ds_to_universal first extracts every partition into a temporary folder
    # beside its output: measured, the peak is about 2.1x the optimiser
    # partitions' bytes and the result 1.4x (small models; about 1x for big ones).
    need = int(2.5 * partitions) + 2 ** 20
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError as exc:
        return f"cannot read the free space under {ckpt_dir}: {exc}. {advice}"
    if free < need:
        return (f"not enough free space to convert {ckpt_dir} to DeepSpeed's universal format (how a ZeRO 1-2 "
                f"checkpoint continues on another number of ranks): it needs about {_mb(need)}, {_mb(free)} "
                f"are free. {advice}")
    tmp = f"{out}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # --inject_missing_state: the universal_checkpoint_info that Megatron
    # clients save; a plain data-parallel model needs only its defaults.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", ckpt_dir,
           "--output_folder", tmp, "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    log.info("converting %s to DeepSpeed's universal format (ZeRO state on another number of ranks)", ckpt_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return (f"converting {ckpt_dir} to DeepSpeed's universal format failed ({' '.join(cmd)}):\n"
                f"{(proc.stdout + proc.stderr)[-3000:]}\n{advice}")
    try:
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"could not move the converted state into {out}: {exc}. {advice}"
    return ""


def load_queue_states(ckpt_dir: str, saved_world: int) -> List[Dict[str, Any]]:
    """The saving ranks' queue states in rank order, for
    ``NegativeQueues.redistribute`` to lay out afresh (another world size,
    size or mode). A replicated queue is whole on every rank: rank 0's is enough."""
    first = load_rank_state(ckpt_dir, 0)["queue"]
    if first["mode"] == "replicated":
        return [first]
    return [first] + [load_rank_state(ckpt_dir, r)["queue"] for r in range(1, saved_world)]


def load_rank_state(ckpt_dir: str, rank: int) -> Dict[str, Any]:
    path = os.path.join(ckpt_dir, "user_state", f"rank_{rank:05d}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {ckpt_dir} is incomplete; pick another checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_weights(ckpt_dir: str) -> Dict[str, torch.Tensor]:
    """The online towers' fp32 weights, without DeepSpeed and without unpickling code."""
    path = os.path.join(ckpt_dir, "model_fp32.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {ckpt_dir} is not a user-dist checkpoint or is incomplete")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_momentum_weights(ckpt_dir: str) -> Dict[str, torch.Tensor]:
    """The key (momentum) towers' fp32 weights from momentum.pt, tensors only (weights_only=True).

    They leave out the frozen CLIP the key towers share with the online ones
    (``clip.*``, see MomentumTowers.state_dict): take those from model_fp32.pt.
    """
    path = os.path.join(ckpt_dir, "momentum.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {ckpt_dir} holds no momentum towers (not a user-dist "
                                "checkpoint, or incomplete); evaluate its online towers (--towers online)")
    return torch.load(path, map_location="cpu", weights_only=True)
