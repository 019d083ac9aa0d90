"""Checkpoints that a kill cannot damage: written under a temporary name, then swapped in by rename.

A checkpoint is ``run_dir/checkpoint/``: ``state.json`` (iteration, fingerprints) and, unless
``checkpoint.weights=false``, the master weights in ``model.safetensors`` (fp32 with
``es.master_dtype=float32``), and ``log.h5``, a copy of the ledger as of the checkpoint (the fallback when
the run's own log.h5 is damaged).  A ledger-only checkpoint is kilobytes: resume rebuilds the weights from
the base model and the ledger.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hpc_es import ownership
from hpc_es.errors import HpcEsError
from hpc_es.fsio import MODEL_MARKER, FileSystemError, as_os_error, describe_os_error, folder_lock, fsync_path
from hpc_es.ownership import CHECKPOINT_NAMES
from hpc_es.schedule import Every

STATE = "state.json"
WEIGHTS = "model.safetensors"
LEDGER = "log.h5"  # the ledger as of the checkpoint

log = logging.getLogger("hpc_es")


class CheckpointError(HpcEsError):
    """A checkpoint is damaged or belongs to another run."""


@dataclass
class CheckpointState:
    iteration: int  # number of completed iterations
    base_model: str
    base_fingerprint: str
    fingerprint: str  # of the weights after `iteration` iterations
    has_weights: bool
    config: str = ""  # the run's config JSON (trajectory keys are checked on resume)


def _dirs(run_dir: str) -> tuple[str, str, str]:
    return (os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "checkpoint.old"),
            os.path.join(run_dir, f"checkpoint.tmp-{os.getpid()}"))


def save(run_dir: str, state: CheckpointState, weights: dict[str, torch.Tensor] | None,
         fault: Any = None, ledger: Any = None) -> None:
    """Write a checkpoint atomically; the previous one stays valid until the final rename.

    Everything is written and fsynced inside the temporary folder, ``state.json`` last, so a
    temporary folder with a state.json is complete; only then is it swapped in.  A failing write (a full
    disk, a read-only mount) removes the temporary folder and is one FileSystemError line; the previous
    checkpoint and the ledger are untouched, so a rerun resumes exactly.
    """
    final, _old, tmp = _dirs(run_dir)
    ownership.remove(tmp, CHECKPOINT_NAMES)
    try:
        _write(final, tmp, state, weights, fault, ledger)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = as_os_error(e)
        if isinstance(e, FileSystemError) or cause is None:
            raise
        raise FileSystemError(f"cannot write the checkpoint {describe_os_error(cause, tmp)}") from None


def _write(final: str, tmp: str, state: CheckpointState, weights: dict[str, torch.Tensor] | None,
           fault: Any, ledger: Any) -> None:
    from safetensors.torch import save_file

    os.makedirs(tmp)
    if weights is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, os.path.join(tmp, WEIGHTS))
        fsync_path(os.path.join(tmp, WEIGHTS))
    if ledger is not None:
        ledger.save(os.path.join(tmp, LEDGER))
    if fault is not None:
        fault("checkpoint_write")
    with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as fh:
        json.dump(state.__dict__, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    replace_dir(tmp, final, CHECKPOINT_NAMES)


def replace_dir(tmp: str, final: str, names: tuple[str, ...] | None) -> None:
    """Swap the complete folder ``tmp`` in as ``final``, durably, so that a kill leaves one of them whole.

    The old ``final`` is renamed to ``final.old`` first and removed last; a kill between the two renames
    leaves ``final.old`` (which ``load`` falls back to) and ``tmp``, never a torn ``final``.  Both are
    removed only when they are ours (``ownership``: ``names`` are what hpc_es writes in them; None: a
    model folder, known by its marker).
    """
    old = f"{final}.old"
    fsync_path(tmp)
    ownership.require(final, names)
    ownership.remove(old, names)
    if os.path.isdir(final):
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(old, ignore_errors=True)


def save_model_folder(model: Any, tokenizer: Any, out: str) -> None:
    """``save_pretrained`` of model and tokenizer into a temporary folder, swapped in as ``out``.

    The folder is marked (``fsio.MODEL_MARKER``) as a model hpc_es saved, so a later save may replace it
    (``fsio.check_model_out``).  A failing write removes the temporary folder, leaves ``out`` as it was
    and is one FileSystemError line.  Saves into one folder take turns (``fsio.folder_lock``).
    """
    with folder_lock(os.path.dirname(os.path.abspath(out))):
        _save_model_folder(model, tokenizer, out)


def _save_model_folder(model: Any, tokenizer: Any, out: str) -> None:
    tmp = f"{out}.tmp-{os.getpid()}"
    ownership.remove(tmp, None)
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, MODEL_MARKER), "x", encoding="utf-8") as fh:  # first: a killed save's
            fh.write("saved by hpc_es; a later save may replace this folder\n")  # leftover is known as ours
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out, None)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: made above
        if os.path.isdir(f"{out}.old") and not os.path.exists(out):  # failed between the two renames
            os.rename(f"{out}.old", out)
        cause = as_os_error(e) if isinstance(e, Exception) else None
        if cause is None or isinstance(e, FileSystemError):
            raise
        raise FileSystemError(f"cannot save the model to {describe_os_error(cause, out)}") from None


def clean_stale(run_dir: str) -> list[str]:
    """Remove what a killed writer left behind (temporary checkpoint and final folders) when it is ours
    (``ownership``; set-up has refused a run_dir where it is not); returns what went."""
    gone = []
    for pattern, names in (("checkpoint.tmp-*", CHECKPOINT_NAMES), ("final.tmp-*", None)):
        for path in sorted(glob.glob(os.path.join(glob.escape(run_dir), pattern))):
            if ownership.foreign_entry(path, names) is None:
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path)
    return gone


def ledger_copy(folder: str) -> str | None:
    """The checkpoint's copy of the ledger, if it has one."""
    path = os.path.join(folder, LEDGER)
    return path if os.path.isfile(path) else None


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
            if not isinstance(state.iteration, int) or isinstance(state.iteration, bool) or state.iteration < 0:
                raise ValueError(f"'iteration' is {state.iteration!r}")
            for key in ("base_fingerprint", "fingerprint", "config"):
                if not isinstance(getattr(state, key), str):
                    raise ValueError(f"'{key}' is not a string")
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint '{path}' is damaged ({e})") from None
        if state.has_weights and not os.path.isfile(os.path.join(folder, WEIGHTS)):
            raise CheckpointError(f"checkpoint '{folder}' is damaged: it lacks {WEIGHTS}")
        return state, folder
    return None


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(os.path.join(folder, WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"checkpoint weights in '{folder}' are unreadable ({e})") from None


class Checkpointer:
    """Rank 0's checkpoints of one run: when they are due (``checkpoint.every`` and the last iteration)
    and what goes in them.  Other ranks hold identical weights and write nothing."""

    def __init__(self, run_dir: str, every: int, total: int, with_weights: bool, base_model: str,
                 base_fingerprint: str, config_json: str, is_main: bool, fault: Any = None) -> None:
        self.run_dir, self.schedule, self.with_weights = run_dir, Every(every, total), with_weights
        self.base_model, self.base_fingerprint, self.config_json = base_model, base_fingerprint, config_json
        self.is_main, self.fault = is_main, fault
        self.saved_at = -1  # iterations covered by the last checkpoint this process wrote

    def due(self, done: int) -> bool:
        return self.schedule.due(done)

    def save(self, done: int, weights: Callable[[], dict[str, torch.Tensor]], fingerprint: str,
             ledger: Any) -> None:
        """A checkpoint after ``done`` iterations: θ (unless ledger-only), the ledger's copy, state.json."""
        if not self.is_main:
            return
        state = CheckpointState(iteration=done, base_model=self.base_model, base_fingerprint=self.base_fingerprint,
                                fingerprint=fingerprint, has_weights=self.with_weights, config=self.config_json)
        save(self.run_dir, state, weights() if self.with_weights else None, self.fault, ledger=ledger)
        self.saved_at = done
        log.info("checkpoint saved after iteration %d", done)
