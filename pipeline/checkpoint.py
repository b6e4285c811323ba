"""Resumable training state, saved and restored the same way by every training stage.

A state file holds the step, every `state_dict`-bearing object (model, optimiser, LR
schedule, EMA), all RNG states and any running statistics, plus a fingerprint of the inputs.
A state whose fingerprint differs from the current run's (other params, data or code) is ignored,
so a changed config never silently resumes a stale run.

With `storage.resume_uri` set, each saved state is also put on S3 under
`<resume_uri>/<stage>/<fingerprint>/state.pt` (`RemoteState`), and a stage that finds no local
state fetches it from there: a task retried on a fresh machine (a pre-empted pod) continues
where the first one stopped. The key holds the fingerprint, so runs of other params, data or
code never read each other's state.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.atomic import atomic_file
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.config import Params, StorageConfig

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


@dataclass(frozen=True)
class RemoteState:
    """The S3 copy of one stage's resume state for one fingerprint (storage.resume_uri)."""

    uri: str  # s3://bucket/prefix/<stage>/<fingerprint>/state.pt
    endpoint: str | None

    @classmethod
    def of(cls, storage: "StorageConfig", stage: str, fingerprint: str) -> "RemoteState | None":
        from pipeline.storage import endpoint_url, object_uri

        if not storage.resume_uri:
            return None
        return cls(object_uri(storage.resume_uri, stage, fingerprint, STATE_FILE), endpoint_url(storage))


def save_state(directory: Path, *, fingerprint: str, step: int, objects: dict[str, Any],
               generator: torch.Generator, stats: dict[str, Any], remote: RemoteState | None = None) -> None:
    """Write the state to `directory` (temp file, then renamed), then put it on `remote`."""
    payload = {"fingerprint": fingerprint, "step": step, "rng": rng_state(generator), "stats": stats,
               "objects": {name: obj.state_dict() for name, obj in objects.items()}}
    path = Path(directory) / STATE_FILE
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    if remote:
        from pipeline.storage import upload_object

        upload_object(path, remote.uri, remote.endpoint)


def load_state(directory: Path, *, fingerprint: str, objects: dict[str, Any],
               generator: torch.Generator, remote: RemoteState | None = None) -> tuple[int, dict[str, Any]] | None:
    """Restore objects and RNG in place; return (step, stats), or None to start fresh. Without
    a local state, the one on `remote` (if any) is fetched first. Every rank of a launched run
    calls it; each reads the same file.

    The file is read with `weights_only=True`: tensors, numbers, strings and containers only
    (`stats` must be made of these), never code that a writable volume could plant in a pickle."""
    path = Path(directory) / STATE_FILE
    # Under a launcher the first process of each machine fetches, the others wait for it.
    if not path.exists() and remote and distributed.local_rank() == 0:
        from pipeline.storage import download_object

        if download_object(remote.uri, path, remote.endpoint):
            print(f"{path}: fetched from {remote.uri}")
    distributed.barrier()
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or corrupt (a full disk, a copy cut short): never block re-runs
        distributed.barrier()  # every rank has tried it before the first process moves it
        if distributed.local_rank() == 0:
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


def clear_state(directory: Path, remote: RemoteState | None = None) -> None:
    """A finished run's state goes, locally and on `remote`."""
    (Path(directory) / STATE_FILE).unlink(missing_ok=True)
    if remote:
        from pipeline.storage import delete_object

        delete_object(remote.uri, remote.endpoint)
