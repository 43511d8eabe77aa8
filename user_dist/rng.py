"""Every global RNG a training process draws from: seeded per rank, saved
with a checkpoint and restored on resume (as weights_only-loadable values)."""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_rank(seed: int, rank: int, salt: int = 0) -> None:
    """Seed torch's, Python's and numpy's global RNGs for this rank from here
    on: ranks draw different dropout noise, and two fresh runs draw the same
    (user extensions that use Python's or numpy's RNG included). ``salt``
    (the step of a resume on other ranks) keeps a restarted stream apart from
    the run's start."""
    s = seed + 1000 * rank + 1 + 7919 * salt
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2 ** 32)




def state() -> Dict[str, Any]:
    """Every RNG the step touches, as weights_only-loadable values."""
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": repr(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore(state: Dict[str, Any]) -> None:
    """Put back what :func:`state` saved."""
    import ast

    torch.set_rng_state(state["torch"])
    # random.getstate() is a tuple of ints (and None): literal_eval parses it
    # without executing anything.
    random.setstate(ast.literal_eval(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
