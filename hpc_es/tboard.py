"""TensorBoard scalars of a run (``log.tensorboard: true``), written by rank 0 to ``run_dir/tensorboard/``.

The event files are a view of the ledger, never a second record: step k holds the scalars of the ledger
row of iteration k-1 (step k = "after k iterations", as the progress line and the eval messages count).
Events are written with tensorboard's own record format, synchronously and flushed after every
iteration, so no writer thread outlives a signal and a live TensorBoard sees each step as it lands.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import time
from collections.abc import Iterable
from typing import IO, Any

from hpc_es import ownership
from hpc_es.errors import ExtraMissing
from hpc_es.ownership import TENSORBOARD_NAMES

FOLDER = "tensorboard"


def _tag(key: str) -> str | None:
    """The TensorBoard tag of a ledger column, or None for columns that are not curves.

    By prefix, so columns added to the ledger later (eval_kl, eval_accuracy_paper, ...) become curves
    without a change here.
    """
    if key.startswith("reward_"):
        return "reward/" + key.removeprefix("reward_")  # mean, max, min (training prompts)
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_")  # test split, only in evaluated iterations
    if key.startswith("time_"):
        return "seconds/" + key.removeprefix("time_")  # per phase, and the whole iteration
    if key == "bytes_sent":
        return "comm/bytes_sent"
    return None


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """Tag -> value for one ledger row; NaN (an iteration without a test-split evaluation) is left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        tag = _tag(key)
        if tag is None or isinstance(value, bool):
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):  # an array-valued column: not a scalar curve
            continue
        if math.isfinite(v):
            out[tag] = v
    return out


class TensorBoardLog:
    """Rank 0's TensorBoard writer: ``start(done_rows)`` once, then ``write(row)`` after each ledger save.

    A resumed run continues the same curves with exactly one value per step, whatever a kill left
    behind.  ``start`` does not trust the event files already in ``run_dir/tensorboard/``: it rebuilds
    the folder from the ledger rows the run resumes from (written into a temporary folder, then swapped
    in by rename) and appends to that.  So steps written after the ledger's last row (a kill between the
    ledger save and the checkpoint, resume from an older checkpoint copy), a step whose ledger row was
    saved but whose event was not (a kill between the two), and a record torn by a kill mid-write are all
    put right, and turning ``log.tensorboard`` on when resuming gives the whole history.  Rebuilding
    costs one small record per iteration: a second for ten thousand iterations.  A kill during the swap
    leaves no folder or a stale temporary one; the next ``start`` rebuilds and cleans up.

    Constructing checks that tensorboard is installed, before a long model load, and touches no file.
    """

    def __init__(self, run_dir: str) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError:
            raise ExtraMissing("log.tensorboard=true", "tensorboard") from None
        self._event, self._summary, self._record = event_pb2, summary_pb2, RecordWriter
        self.folder = os.path.join(run_dir, FOLDER)
        self._fh: IO[bytes] | None = None
        self._writer: Any = None

    def start(self, done_rows: Iterable[dict[str, Any]]) -> None:
        """Rebuild the folder from the ledger rows of the completed iterations; new rows append to it."""
        for stale in glob.glob(f"{glob.escape(self.folder)}.tmp-*") + glob.glob(f"{glob.escape(self.folder)}.old-*"):
            ownership.remove(stale, TENSORBOARD_NAMES)
        ownership.require(self.folder, TENSORBOARD_NAMES)
        pid = os.getpid()
        tmp, old = f"{self.folder}.tmp-{pid}", f"{self.folder}.old-{pid}"
        os.makedirs(tmp)
        name = f"events.out.tfevents.{int(time.time())}.hpc_es.{pid}"
        with open(os.path.join(tmp, name), "wb") as fh:
            writer = self._record(fh)
            header = self._event.Event(wall_time=time.time(), file_version="brain.Event:2")
            writer.write(header.SerializeToString())
            # A TensorBoard that read the replaced files drops what it holds for steps >= 0 on this event.
            restart = self._event.Event(wall_time=time.time(), step=0,
                                        session_log=self._event.SessionLog(status=self._event.SessionLog.START))
            writer.write(restart.SerializeToString())
            for row in done_rows:
                self._write(writer, row)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(self.folder):
            os.rename(self.folder, old)
        os.rename(tmp, self.folder)
        shutil.rmtree(old, ignore_errors=True)
        self._fh = open(os.path.join(self.folder, name), "ab")  # kept open across iterations
        self._writer = self._record(self._fh)

    def write(self, row: dict[str, Any]) -> None:
        """One iteration's scalars, flushed (called after the ledger holds the row)."""
        if self._writer is None or self._fh is None:
            raise RuntimeError("TensorBoardLog.write before start")
        self._write(self._writer, row)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = self._writer = None

    def _write(self, writer: Any, row: dict[str, Any]) -> None:
        values = [self._summary.Summary.Value(tag=tag, simple_value=v) for tag, v in scalars(row).items()]
        event = self._event.Event(wall_time=time.time(), step=int(row["iteration"]) + 1,
                                  summary=self._summary.Summary(value=values))
        writer.write(event.SerializeToString())
