"""The HDF5 ledger: one row per iteration, written by rank 0, never half-written.

The whole file is rewritten to a temporary name and renamed after every iteration: a reader or a
kill sees the previous complete ledger or the new one, never a torn write.  At a few hundred bytes
per iteration this costs milliseconds.  Since weights_T = base + sum_t (alpha_t/N) sum_n Z_tn eps_tn,
the ledger (seeds, signs, shaped, sigma, alpha) is itself a checkpoint.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

from hpc_es.errors import HpcEsError
from hpc_es.fsio import FileSystemError, describe_os_error

MATRIX = {"seeds": np.int64, "signs": np.int8, "rewards": np.float64, "shaped": np.float64}
SCALARS = {
    "iteration": np.int64, "sigma": np.float64, "alpha": np.float64,
    "reward_mean": np.float64, "reward_max": np.float64, "reward_min": np.float64,
    "time_perturb": np.float64, "time_rollout": np.float64, "time_reward": np.float64,
    "time_restore": np.float64, "time_update": np.float64, "time_iteration": np.float64,
    "bytes_sent": np.int64, "world_size": np.int64, "slots": np.int64,
    # test split (eval.every): NaN in the iterations that were not evaluated (hpc_es.evaluate.METRICS)
    "eval_reward": np.float64, "eval_accuracy": np.float64, "eval_accuracy_paper": np.float64,
    "eval_kl_per_token": np.float64, "eval_kl_per_completion": np.float64, "time_eval": np.float64,
    "eval_kl_k3_per_token": np.float64, "eval_kl_k3_per_completion": np.float64,
}
# columns added after ledgers were first written: a ledger without them loads with NaN there
LATER_COLUMNS = ("eval_accuracy_paper", "eval_kl_per_token", "eval_kl_per_completion", "eval_kl_k3_per_token",
                 "eval_kl_k3_per_completion")
VERSION = 1


class LedgerError(HpcEsError):
    """log.h5 is missing, truncated or does not belong to this run."""


class Ledger:
    def __init__(self, population: int, attrs: dict[str, Any] | None = None) -> None:
        self.population = population
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.rows: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        row = {**{k: np.nan for k in LATER_COLUMNS}, **row}  # a row made before they existed: NaN there
        missing = (set(MATRIX) | set(SCALARS)) - set(row)
        if missing:
            raise ValueError(f"ledger row lacks {sorted(missing)}")
        if self.rows and row["iteration"] != self.rows[-1]["iteration"] + 1:
            raise ValueError(f"ledger row for iteration {row['iteration']} after {self.rows[-1]['iteration']}")
        self.rows.append(row)

    def column(self, key: str) -> np.ndarray:
        dtype = MATRIX.get(key) or SCALARS[key]
        if key in MATRIX:
            return np.array([r[key] for r in self.rows], dtype=dtype).reshape(len(self.rows), self.population)
        return np.array([r[key] for r in self.rows], dtype=dtype)

    def save(self, path: str) -> None:
        """Write the whole ledger to ``path`` atomically (temp file, fsync, rename).

        The HDF5 image is built in memory and written with plain file I/O, so a full disk or a read-only
        mount is one OSError (reported as a FileSystemError; the previous ledger stays in place and the
        temporary file is removed) rather than HDF5 errors from inside its cache flushes.
        """
        import h5py

        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            f.attrs["version"] = VERSION
            for k, v in self.attrs.items():
                f.attrs[k] = v
            f.attrs["events"] = json.dumps(self.events)
            for key in MATRIX:
                data = self.column(key)
                f.create_dataset(key, data=data, maxshape=(None, self.population),
                                 chunks=(max(1, min(64, len(data) or 1)), self.population))
            for key in SCALARS:
                data = self.column(key)
                f.create_dataset(key, data=data, maxshape=(None,), chunks=(max(1, min(1024, len(data) or 1)),))
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(image.getbuffer())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise FileSystemError(f"cannot write the ledger {describe_os_error(e, path)}") from None
        try:  # make the rename itself durable
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    @classmethod
    def load(cls, path: str) -> "Ledger":
        import h5py

        try:
            with h5py.File(path, "r") as f:
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
                events = json.loads(attrs.pop("events", "[]"))
                attrs.pop("version", None)
                seeds = f["seeds"][()]
                n_iter, population = seeds.shape
                ledger = cls(population, attrs)
                ledger.events = events
                cols = {k: f[k][()] if k in f or k not in LATER_COLUMNS else np.full(n_iter, np.nan)
                        for k in list(MATRIX) + list(SCALARS)}
        except FileNotFoundError:
            raise LedgerError(f"ledger '{path}' does not exist") from None
        except Exception as e:  # noqa: BLE001 - h5py reports damage as OSError, KeyError, ValueError, RuntimeError...
            raise LedgerError(f"ledger '{path}' is unreadable or incomplete ({type(e).__name__}: {e})") from None
        for key, col in cols.items():
            if len(col) != n_iter:
                raise LedgerError(f"ledger '{path}' is inconsistent: '{key}' has {len(col)} rows, seeds {n_iter}")
        if not np.array_equal(cols["iteration"], np.arange(n_iter)):
            raise LedgerError(f"ledger '{path}' is inconsistent: its iterations are not 0..{n_iter - 1}")
        for t in range(n_iter):
            row = {k: (cols[k][t].copy() if k in MATRIX else cols[k][t].item()) for k in cols}
            ledger.rows.append(row)
        return ledger

    @property
    def config(self) -> dict[str, Any]:
        try:
            return json.loads(self.attrs["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise LedgerError(f"ledger has no readable 'config' attribute ({type(e).__name__}: {e})") from None
