"""The DeepSpeed config, derived from the run's YAML config (one source of truth).

A user-supplied DeepSpeed JSON (``train.deepspeed_config``) may override keys;
every overridden key is reported so that nothing disagrees silently.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Tuple

from .config import Config, ConfigError
from .plan import BatchLayout

log = logging.getLogger("user_dist")


def resolve(cfg: Config, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed config a job runs with: derived, then the user's JSON on
    top (each overridden key logged). Raises ConfigError for what DeepSpeed
    would refuse from deep inside (fp16 where the accelerator has none)."""
    ds, diff = with_user_override(derive(cfg, world_size), cfg.train.deepspeed_config)
    for line in diff:
        log.warning("deepspeed_config override: %s", line)
    if ds.get("fp16", {}).get("enabled"):
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():  # else a ValueError from deep inside DeepSpeed
            raise ConfigError(
                f"train.precision=fp16, but DeepSpeed's {get_accelerator().device_name()} accelerator reports "
                "no fp16 support here (most CPUs; GPUs before compute capability 7.0). Use "
                "train.precision=bf16 where the device has it, or fp32")
    return ds


def zero_stage(ds: Dict[str, Any]) -> int:
    """The ZeRO stage a (final) DeepSpeed config runs with."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def derive(cfg: Config, world_size: int) -> Dict[str, Any]:
    """DeepSpeed config dict for this run and world size."""
    t = cfg.train
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": BatchLayout.of(t, world_size).global_batch,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        # bf16 runs under torch autocast: parameters, gradients and optimiser
        # state stay fp32 (BatchNorm, GRU and the loss keep fp32 numerics and
        # the momentum towers average fp32 weights), matmuls run in bf16.
        "torch_autocast": {"enabled": t.precision == "bf16", "dtype": "bfloat16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        # We print our own progress; DeepSpeed's per-step prints would spam every rank.
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return ds


def step_owns_optimizer(ds: Dict[str, Any]) -> bool:
    """Whether the training step calls the plain torch optimiser itself: no
    ZeRO (whose partitioned optimiser DeepSpeed drives) and no fp16 (whose
    loss-scaling wrapper DeepSpeed drives). ``ds`` is the final config, after
    the user's override. Then the step clips (``take_clipping``) and skips
    non-finite steps on the device (user_dist.nonfinite)."""
    return zero_stage(ds) == 0 and not ds.get("fp16", {}).get("enabled", False)


def take_clipping(ds: Dict[str, Any]) -> float:
    """Move gradient-norm clipping out of DeepSpeed where the training step
    does it better; return the max norm the step must clip to (0: DeepSpeed
    clips, or nobody).

    Without ZeRO (and without fp16, whose loss-scaled gradients DeepSpeed
    unscales before it clips) the gradients are whole and already averaged
    over ranks after the backward, so one foreach norm and scale with no host
    sync does it; DeepSpeed's ZeRO-0 clipping loops over the parameters in
    Python, hundreds of small kernels per step. ``ds`` is the final config
    (after the user's override) and is changed in place.
    """
    clip = float(ds.get("gradient_clipping", 0.0) or 0.0)
    if clip <= 0 or not step_owns_optimizer(ds):
        return 0.0
    ds["gradient_clipping"] = 0.0
    return clip


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_user_override(derived: Dict[str, Any], path: str) -> Tuple[Dict[str, Any], List[str]]:
    """Apply a user's DeepSpeed JSON on top; return the result and a diff."""
    if not path:
        return derived, []
    try:
        with open(path) as f:
            user = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"train.deepspeed_config: cannot read {path} as JSON: {exc}") from exc
    if not isinstance(user, dict):
        raise ConfigError(f"train.deepspeed_config: {path} must hold a JSON object")
    merged = _merge(derived, user)
    before, after = _flatten(derived), _flatten(merged)
    diff = [f"{k}: {before.get(k, '<unset>')!r} -> {after[k]!r}" for k in sorted(after)
            if before.get(k, "<unset>") != after[k]]
    return merged, diff
