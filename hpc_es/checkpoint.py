"""Checkpoints that a kill cannot damage: written under a temporary name, then swapped in by rename.

A checkpoint is ``run_dir/checkpoint/``: ``state.json`` (iteration, fingerprints) and, unless
``checkpoint.weights=false``, the base weights in ``model.safetensors``.  A ledger-only checkpoint is
kilobytes: resume rebuilds the weights from the base model and the ledger.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from hpc_es.errors import HpcEsError

STATE = "state.json"
WEIGHTS = "model.safetensors"


class CheckpointError(HpcEsError):
    """A checkpoint is damaged or belongs to another run."""


@dataclass
class CheckpointState:
    iteration: int  # number of completed iterations
    base_model: str
    base_fingerprint: str
    fingerprint: str  # of the weights after `iteration` iterations
    has_weights: bool


def _dirs(run_dir: str) -> tuple[str, str, str]:
    return (os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "checkpoint.old"),
            os.path.join(run_dir, f"checkpoint.tmp-{os.getpid()}"))


def save(run_dir: str, state: CheckpointState, weights: dict[str, torch.Tensor] | None,
         fault: Any = None) -> None:
    """Write a checkpoint atomically; the previous one stays valid until the final rename."""
    from safetensors.torch import save_file

    final, old, tmp = _dirs(run_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if weights is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, os.path.join(tmp, WEIGHTS))
    if fault is not None:
        fault("checkpoint_write")
    with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as fh:
        json.dump(state.__dict__, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load(run_dir: str) -> tuple[CheckpointState, str] | None:
    """The newest complete checkpoint (state, folder), or None; a damaged one is an error, not a restart."""
    final, old, _ = _dirs(run_dir)
    for folder in (final, old):  # .old survives only when a kill came between the two renames
        path = os.path.join(folder, STATE)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                state = CheckpointState(**json.load(fh))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint '{path}' is damaged ({e}); remove it to resume from the ledger") from None
        if state.has_weights and not os.path.isfile(os.path.join(folder, WEIGHTS)):
            raise CheckpointError(f"checkpoint '{folder}' lacks {WEIGHTS}; remove it to resume from the ledger")
        return state, folder
    return None


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(os.path.join(folder, WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"checkpoint weights in '{folder}' are unreadable ({e})") from None
