"""Everything that reads a run_dir and decides how a run continues: ``plan`` reads, ``apply`` acts.

A run_dir holds the ledger (log.h5), maybe a checkpoint (weights or ledger-only, with its own copy of the
ledger) and the leftovers of a kill.  ``plan`` reads them, works around damage where the remaining files
allow it, checks that they belong to this run (one trajectory check for checkpoint and ledger) and
returns a ``ResumePlan``; it changes nothing, so every rank can call it.  ``apply`` loads weights and
replays ledger rows onto a ``Population``; ``repair`` is rank 0's part (rename a damaged log.h5, remove
stale temporary folders).  ``replay`` (rebuilding weights from the ledger alone) uses the same reading
and the same checks.

Since weights_T = base + sum_t (alpha_t/N) sum_n Z_tn eps_tn, ledger rows can stand in for weights:
a damaged checkpoint costs a replay, never the run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from hpc_es import checkpoint as ckpt
from hpc_es.config import Config
from hpc_es.ledger import Ledger, LedgerError
from hpc_es.noise import scheme_of, trajectory_keys
from hpc_es.progress import say, warn

# Config keys that define the trajectory: a resumed run must agree on all of them.
TRAJECTORY_KEYS = ("model", "task", "seed", "dtype", "es.population_size", "es.sigma", "es.alpha",
                   "es.antithetic", "es.shaping", "rollout", "data", "tiny", "prompt",
                   "es.noise", "es.rank", "es.lowrank_scope",  # issue 14: the low-rank mode's keys
                   "es.master_dtype")  # issue 12: an fp32 master is another trajectory
# (issue 12: es.noise_scheme and, under legacy noise, es.noise_chunk come from noise.trajectory_keys)


class Updates(Protocol):
    """What ledger rows are replayed onto (a ``Population``, or replay's single model copy)."""

    def update(self, seeds: np.ndarray, signs: np.ndarray, shaped: np.ndarray, alpha: float) -> None: ...


class Weights(Updates, Protocol):
    """What ``apply`` needs of the model copies it restores (a ``Population`` is one)."""

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None: ...

    def fingerprint(self) -> str: ...  # of the master (θ), as checkpoints record it


@dataclass
class ResumePlan:
    """How to continue a run_dir (``plan`` returns None for a fresh one)."""

    start: int  # the first iteration to run = the ledger's length
    done: int  # iterations the checkpoint covers (0: no checkpoint)
    rows: list[dict[str, Any]]  # every ledger row so far; rows[done:] are replayed onto checkpoint weights
    events: list[dict[str, Any]]
    checkpoint: str | None  # the checkpoint folder whose weights to load; None: start from the base model
    fingerprint: str  # the checkpoint's fingerprint after ``done`` iterations ("" without a checkpoint)
    noise_device: str  # where the run drew its noise
    notes: list[str] = field(default_factory=list)  # what was worked around, for rank 0 to say
    keep_damaged: bool = False  # log.h5 is damaged: keep it as log.h5.damaged and write the ledger anew
    from_weights: bool = False  # set by ``apply``: the checkpoint's weights were used


def _with_defaults(default: Any, given: Any) -> Any:
    """``given`` with the keys it lacks taken from ``default``: a ledger written before a config key
    existed holds the run that key's default describes (issue 14)."""
    if not isinstance(default, dict) or not isinstance(given, dict):
        return given
    return {**default, **{k: _with_defaults(default.get(k), v) for k, v in given.items()}}


def trajectory(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    cfg_dict = _with_defaults(Config().to_dict(), cfg_dict)
    out = {}
    for key in TRAJECTORY_KEYS:
        v: Any = cfg_dict
        for part in key.split("."):
            v = v[part]
        out[key] = v
    out.update(trajectory_keys(cfg_dict))  # issue 12: es.noise_scheme (absent = legacy); es.noise_chunk under legacy
    return out


def check_same_run(what: str, base_fingerprint: Any, config: str | dict[str, Any] | None, cfg: Config,
                   model_fingerprint: str, model_path: str, action: str = "resume") -> None:
    """The one trajectory check: ``what`` (a checkpoint or a ledger) was made from this base model with the
    same trajectory keys (``model`` itself may move: the base model's fingerprint is what counts)."""
    if base_fingerprint != model_fingerprint:
        raise ckpt.CheckpointError(
            f"{what} was made from a base model with fingerprint {str(base_fingerprint)[:16]}, but "
            f"'{model_path}' has {model_fingerprint[:16]}; refusing to {action} onto a different model")
    if not config:
        return
    now = trajectory(json.loads(cfg.to_json()))
    try:
        was = trajectory(json.loads(config) if isinstance(config, str) else config)
        diff = [k for k in was if was[k] != now[k] and k != "model"]
    except (KeyError, TypeError, ValueError):
        diff = ["config (unreadable)"]
    if diff:
        raise ckpt.CheckpointError(f"{what} belongs to a run with different {', '.join(diff)}; "
                                   "use a new run_dir or the same settings")


def noise_device(ledger: Ledger) -> str:
    """The device type the run's noise is tied to (legacy: CPU and CUDA generators differ); "" for none (keyed
    noise has the same bits on every device)."""
    if scheme_of(ledger.attrs) != "legacy":  # issue 12
        return ""
    return str(ledger.attrs.get("noise_device", "cpu"))


def check_noise_device(where: str, recorded: str, device_type: str) -> None:
    if recorded and recorded != device_type:  # issue 12: "" = keyed noise, any device
        raise ckpt.CheckpointError(
            f"{where} drew its noise on {recorded} but this run is on {device_type}; replaying its ledger "
            "needs the same device type (CPU and CUDA generators differ)")


def read_ledger(run_dir: str) -> tuple[Ledger, str | None]:
    """The run's ledger, or the checkpoint's copy when log.h5 is damaged; and a note saying so."""
    path = os.path.join(run_dir, "log.h5")
    try:
        return Ledger.load(path), None
    except LedgerError as e:
        found = _checkpoint_folder(run_dir)
        copy = ckpt.ledger_copy(found) if found else None
        if copy is None:
            raise
        try:
            ledger = Ledger.load(copy)
        except LedgerError:
            raise e from None
        return ledger, f"{e}; using the checkpoint's copy of the ledger ({len(ledger)} iterations)"


def _checkpoint_folder(run_dir: str) -> str | None:
    """The checkpoint folder to take a ledger copy from: the valid one, else any that holds a copy."""
    try:
        found = ckpt.load(run_dir)
    except ckpt.CheckpointError:
        found = None
    if found is not None:
        return found[1]
    for name in ("checkpoint", "checkpoint.old"):
        folder = os.path.join(run_dir, name)
        if ckpt.ledger_copy(folder):
            return folder
    return None


def plan(cfg: Config, model_fingerprint: str, model_path: str, device_type: str) -> ResumePlan | None:
    """Read ``cfg.run_dir`` and decide how to continue; None for a fresh run_dir.  Reads only.

    A run_dir that holds a run is never silently restarted from zero: what cannot be worked around is
    a ``CheckpointError`` that says what was found and that nothing was changed.
    """
    run_dir = cfg.run_dir
    log_path = os.path.join(run_dir, "log.h5")
    notes: list[str] = []
    try:
        found, ckpt_damage = ckpt.load(run_dir), None
    except ckpt.CheckpointError as e:
        found, ckpt_damage = None, e
    state, folder = found if found is not None else (None, None)
    old: Ledger | None = None
    log_damage: LedgerError | None = None
    if os.path.exists(log_path):
        try:
            old = Ledger.load(log_path)
        except LedgerError as e:
            log_damage = e
    if found is None and ckpt_damage is None and old is None and log_damage is None:
        return None
    if state is not None:
        check_same_run(f"the checkpoint in '{run_dir}'", state.base_fingerprint, state.config, cfg,
                       model_fingerprint, model_path)
    done = state.iteration if state is not None else 0
    keep_damaged = False
    if old is None or len(old) < done:
        why = (f"{log_damage}" if log_damage is not None else "log.h5 is missing" if old is None else
               f"log.h5 holds {len(old)} iterations but the checkpoint is at {done}")
        copy = ckpt.ledger_copy(folder) if folder is not None else None
        if copy is None:
            extra = (f"and the checkpoint is damaged too ({ckpt_damage})" if ckpt_damage is not None else
                     "and there is no checkpoint to recover from" if state is None else
                     "and the checkpoint holds no copy of the ledger")
            raise ckpt.CheckpointError(f"cannot resume run_dir '{run_dir}': {why}, {extra}; nothing was "
                                       "changed (use a new run_dir to start afresh)")
        try:
            old = Ledger.load(copy)
        except LedgerError as e:
            raise ckpt.CheckpointError(f"cannot resume run_dir '{run_dir}': {why}, and the checkpoint's "
                                       f"copy of the ledger is damaged too ({e})") from None
        if len(old) != done:
            raise ckpt.CheckpointError(f"cannot resume run_dir '{run_dir}': {why}, and the checkpoint's copy "
                                       f"of the ledger holds {len(old)} iterations, not {done}")
        keep_damaged = os.path.exists(log_path)
        notes.append(f"{why}; continuing from the checkpoint's copy of the ledger ({done} iterations)"
                     + ("; the damaged file is kept as log.h5.damaged" if keep_damaged else ""))
    if ckpt_damage is not None:
        notes.append(f"{ckpt_damage}; rebuilding the weights from the base model and the ledger")
    check_same_run(f"run_dir '{run_dir}'", old.attrs.get("base_fingerprint"), old.config, cfg,
                   model_fingerprint, model_path)
    if len(old) > cfg.es.iterations:
        raise ckpt.CheckpointError(
            f"run_dir '{run_dir}' holds {len(old)} completed iterations, more than es.iterations="
            f"{cfg.es.iterations}; raise es.iterations to continue it, or get earlier weights with "
            f"`python -m hpc_es replay {run_dir} --iteration T --out DIR`")
    with_weights = state is not None and state.has_weights
    recorded = noise_device(old)
    if len(old) > (done if with_weights else 0):  # rows will be replayed: the noise must be the same
        check_noise_device(f"run_dir '{run_dir}'", recorded, device_type)
    return ResumePlan(start=len(old), done=done, rows=list(old.rows), events=list(old.events),
                      checkpoint=folder if with_weights else None,
                      fingerprint=state.fingerprint if state is not None else "", noise_device=recorded,
                      notes=notes, keep_damaged=keep_damaged)


def replay_rows(target: Updates, rows: list[dict[str, Any]]) -> None:
    """Apply recorded updates without a rollout: weights depend on seeds, signs, shaped and alpha only."""
    for row in rows:
        target.update(np.asarray(row["seeds"]), np.asarray(row["signs"]), np.asarray(row["shaped"]),
                      float(row["alpha"]))


def apply(p: ResumePlan, target: Weights, base_weights: Callable[[], dict[str, torch.Tensor]],
          run_dir: str, device_type: str) -> None:
    """Bring ``target`` (holding the base model) to the weights after ``p.start`` iterations.

    The checkpoint's weights when they load and match their recorded fingerprint; otherwise the base
    model plus every ledger row, checked against the checkpoint's fingerprint on the way.
    """
    rows_from = 0  # the ledger rows not covered by loaded weights
    if p.checkpoint is not None:
        try:
            target.load_weights(ckpt.load_weights(p.checkpoint))
            got = target.fingerprint()
            if got != p.fingerprint:
                raise ckpt.CheckpointError(f"checkpoint weights in '{p.checkpoint}' have fingerprint {got[:16]} "
                                           f"but state.json records {p.fingerprint[:16]}")
            rows_from, p.from_weights = p.done, True
        except (ckpt.CheckpointError, RuntimeError) as e:
            p.notes.append(f"{e}; rebuilding the weights from the base model and the ledger")
            target.load_weights(base_weights())
            if p.start > 0:
                check_noise_device(f"run_dir '{run_dir}'", p.noise_device, device_type)
    if p.fingerprint and rows_from == 0 and p.done > 0:
        # Rebuilding from the base: the checkpoint's fingerprint checks the ledger on the way.
        replay_rows(target, p.rows[:p.done])
        got = target.fingerprint()
        if got != p.fingerprint:
            raise ckpt.CheckpointError(
                f"replaying the first {p.done} ledger iterations of '{run_dir}' gives weights {got[:16]}, but "
                f"the checkpoint recorded {p.fingerprint[:16]}: the ledger and the checkpoint disagree")
        rows_from = p.done
    replay_rows(target, p.rows[rows_from:])


def repair(p: ResumePlan, run_dir: str, ledger: Ledger) -> None:
    """Rank 0, after every rank has read run_dir: set damaged files aside, remove leftovers, say where the
    run continues."""
    log_path = os.path.join(run_dir, "log.h5")
    if p.keep_damaged:
        os.replace(log_path, log_path + ".damaged")
        ledger.save(log_path)
    ckpt.clean_stale(run_dir)
    for note in p.notes:
        warn(note)
    source = f"checkpoint weights after iteration {p.done}" if p.from_weights else "the base model"
    say(f"resuming {run_dir} at iteration {p.start} (from {source} + "
        f"{p.start - p.done if p.from_weights else p.start} ledger rows replayed)")
