"""Training checkpoints in the artifact store: complete or invisible, and never a pickle.

A checkpoint is a set of files under ``<prefix>/step-<N>/``: the experts (``save_experts``), the optimizer state
and the RNG state as safetensors, and a JSON state (stage, step, sampler position, scheduler, weights). Files go
up first; ``COMPLETE.json`` with every file's sha256 goes last, so a crash mid-write leaves a folder that
resume ignores. On resume the newest checkpoint whose checksums still match wins; a damaged one is skipped
for the previous (RELIABILITY.md §2). Two are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.storage import ArtifactNotFoundError, ArtifactStore

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE.json"
KEEP = 2
_STEP = re.compile(r"step-(\d{8})$")


@dataclass
class Checkpoint:
    step: int
    key: str  # store prefix of this checkpoint
    folder: Path  # local copy
    state: dict[str, Any]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state as safetensors-ready tensors plus a JSON part (hyper-parameters, scalar state)."""
    full = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in full["state"].items():
        for name, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": full["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return tensors


def restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_checkpoint(store: ArtifactStore, prefix: str, step: int, folder: Path) -> str:
    """Upload every file of ``folder`` under ``prefix/step-N/``, then the COMPLETE manifest; prune old ones."""
    key = f"{prefix}/step-{step:08d}"
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        store.put_bytes(f"{key}/{relative}", data)
        files[relative] = _sha256(data)
    store.put_bytes(f"{key}/{COMPLETE}", json.dumps({"step": step, "files": files}, sort_keys=True).encode())
    for old in list_checkpoints(store, prefix)[:-KEEP]:
        store.delete(old)
    return key


def list_checkpoints(store: ArtifactStore, prefix: str) -> list[str]:
    """Checkpoint keys under ``prefix``, oldest first (complete or not)."""
    steps = set()
    for key in store.list(prefix):
        match = _STEP.search(key.rsplit("/", 1)[0]) if "/" in key else None
        if match:
            steps.add(key.rsplit("/", 1)[0])
    return sorted(steps)


def load_latest(store: ArtifactStore, prefix: str, into: Path) -> Checkpoint | None:
    """The newest complete, intact checkpoint, downloaded into ``into``; ``None`` when there is none."""
    for key in reversed(list_checkpoints(store, prefix)):
        try:
            manifest = json.loads(store.get_bytes(f"{key}/{COMPLETE}"))
        except (ArtifactNotFoundError, json.JSONDecodeError):
            log.warning("checkpoint %s is incomplete; skipping it", key)
            continue
        folder = Path(tempfile.mkdtemp(prefix="ckpt-", dir=into))
        intact = True
        for relative, digest in manifest["files"].items():
            try:
                data = store.get_bytes(f"{key}/{relative}")
            except ArtifactNotFoundError:
                data = b""
            if _sha256(data) != digest:
                log.warning("checkpoint %s: %s is damaged; falling back to the previous checkpoint", key, relative)
                intact = False
                break
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(data)
        if intact:
            state = json.loads((folder / "state.json").read_text())
            return Checkpoint(step=int(manifest["step"]), key=key, folder=folder, state=state)
    return None


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file(tensors, str(path))


def load_tensors(path: Path) -> dict[str, Tensor]:
    return load_file(str(path), device="cpu")
