"""Resumable training state, saved and restored the same way by every training stage.

A state file holds the step, every `state_dict`-bearing object (model, optimiser, LR
schedule, EMA), all RNG states and any running statistics, plus a fingerprint of the inputs.
A state whose fingerprint differs from the current run's (other params, data or code) is ignored,
so a changed config never silently resumes a stale run.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.atomic import atomic_file
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.config import Params

STATE_FILE = "state.pt"


class DivergedError(UserError):
    """A training loss became NaN or infinite; nothing was saved or registered."""


def ensure_finite(loss: torch.Tensor, stage: str, step: str, resume_dir: Path) -> None:
    """Stop at the first non-finite loss, naming the stage, the step and the last good resume
    state, before the optimiser applies it (a diverged model must never be saved)."""
    if bool(torch.isfinite(loss).all()):
        return
    state = Path(resume_dir) / STATE_FILE
    last = (f"the last good state is {state} (step {torch.load(state, weights_only=True)['step']})"
            if state.exists() else f"no resume state was saved yet ({state})")
    raise DivergedError(f"{stage}: the loss is {float(loss.detach().float().mean())} at {step}; nothing was "
                        f"saved or registered; {last}. Lower the learning rate or check the data.")


def file_hash(*paths: Path) -> str:
    """Short sha256 of the bytes of the files (every file of a folder, in path order)."""
    h = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for f in files:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def fingerprint(params: "Params", sections: list[str], inputs: list[Path], code: str) -> str:
    """What a resumable state depends on: the params sections the stage reads, its input files
    and its code (`code`: pipeline.stage_code.code_hash of the stage)."""
    return f"{params.section_hash(*sections)}-{file_hash(*inputs)}-{code}"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG's state as tensors, numbers and tuples (what weights_only loading reads)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: Path, *, fingerprint: str, step: int, objects: dict[str, Any],
               generator: torch.Generator, stats: dict[str, Any]) -> None:
    payload = {"fingerprint": fingerprint, "step": step, "rng": rng_state(generator), "stats": stats,
               "objects": {name: obj.state_dict() for name, obj in objects.items()}}
    with atomic_file(Path(directory) / STATE_FILE) as tmp:
        torch.save(payload, tmp)


def load_state(directory: Path, *, fingerprint: str, objects: dict[str, Any],
               generator: torch.Generator) -> tuple[int, dict[str, Any]] | None:
    """Restore objects and RNG in place; return (step, stats), or None to start fresh.

    The file is read with `weights_only=True`: tensors, numbers, strings and containers only
    (`stats` must be made of these), never code that a writable volume could plant in a pickle."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or corrupt (a full disk, a copy cut short): never block re-runs
        aside = path.with_name(STATE_FILE + ".unreadable")
        os.replace(path, aside)
        print(f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]}); moved to {aside}; starting fresh")
        return None
    if payload.get("fingerprint") != fingerprint:
        print(f"{path}: saved for other params, data or code; starting fresh")
        return None
    for name, obj in objects.items():
        obj.load_state_dict(payload["objects"][name])
    restore_rng(payload["rng"], generator)
    return payload["step"], payload["stats"]


def clear_state(directory: Path) -> None:
    (Path(directory) / STATE_FILE).unlink(missing_ok=True)
