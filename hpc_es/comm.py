"""The only thing ranks exchange: a few float64 scalars per iteration (and a few bytes for checks).

One small interface, three backends: MPI (mpi4py), torch.distributed (gloo on CPU tensors, even on a
GPU node, since the payload is tens of bytes), and a single process.  Every backend counts the bytes
this rank sends, so the ledger can prove that no weights ever cross.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from hpc_es.errors import DistributedError, HpcEsError

LENGTH_BYTES = 8  # allgather sends each payload's length first


class Comm:
    """A single process: the identity for every collective."""

    name = "none"

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.local_size = 1
        self.bytes_sent = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        self.bytes_sent += x.nbytes
        return np.array(x, dtype=np.float64, copy=True)

    def allgather(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload``, in rank order.  Counted as on the wire: an 8-byte length, then the
        payload padded to the longest one (every backend sends exactly this)."""
        self.bytes_sent += LENGTH_BYTES + len(payload)
        return [bytes(payload)]

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        sys.stderr.flush()
        os._exit(code)

    def close(self) -> None:
        pass


class CollectiveTimeout(DistributedError):
    """Some rank(s) did not reach a collective within dist.timeout_s.  ``reporter`` is the lowest rank
    that was waiting: it alone prints the message (the hung rank cannot, and may be rank 0)."""

    def __init__(self, message: str, reporter: int) -> None:
        super().__init__(message)
        self.reporter = reporter


POLL_MAX_S = 0.002  # longest sleep between polls of a pending collective (waiting ranks stay near 0 % CPU)
ROLL_CALL_AFTER_S = 0.1  # a collective pending this long takes part in (MPI) or records (torch) the roll call
ROLL_CALL_GRACE_S = 2.0  # after a timeout: how long to wait for the other waiting ranks to answer


def _missing_message(what: str, seq: int, timeout_s: float, missing: list[int], waiting: list[int]) -> str:
    if not missing:
        return (f"{what} #{seq} did not complete within dist.timeout_s={timeout_s:g} s although every rank "
                "reached it (a network or MPI failure)")
    return (f"rank(s) {', '.join(map(str, missing))} did not reach {what} #{seq} within dist.timeout_s="
            f"{timeout_s:g} s (hung or stuck in their own work; rank(s) {', '.join(map(str, waiting))} waited)")


class MPIComm(Comm):
    """MPI with a bound: every collective is non-blocking and polled against ``dist.timeout_s``.

    On expiry the waiting ranks hold a roll call over point-to-point messages on a private communicator
    (a rank that is itself waiting in the collective answers; a hung one cannot), so the error names the
    rank(s) that never arrived.
    """

    name = "mpi"
    _ASK, _ANSWER = 1, 2

    def __init__(self, timeout_s: float = 600.0) -> None:
        super().__init__()
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise DistributedError(f"dist.backend=mpi needs mpi4py and an MPI library: {e}") from None
        self._MPI = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.world_size = self._comm.Get_size()
        local = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = local.Get_rank()
        self.local_size = local.Get_size()
        local.Free()
        self._roll = self._comm.Dup()  # roll-call messages never mix with the collectives
        self.timeout_s = timeout_s
        self._seq = 0  # collectives started by this rank
        self._pending_sends: list[Any] = []

    def _wait(self, request: Any, what: str) -> None:
        """Poll ``request`` until done, sleeping between polls; answer roll calls; raise on the deadline."""
        self._seq += 1
        if request.Test():
            return
        start = time.monotonic()
        deadline = start + self.timeout_s
        pause = 20e-6
        next_roll = start + ROLL_CALL_AFTER_S
        while not request.Test():
            now = time.monotonic()
            if now >= next_roll:
                self._answer_roll_calls()
                next_roll = now + ROLL_CALL_AFTER_S
            if now >= deadline:
                self._timed_out(what)
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX_S)

    def _answer_roll_calls(self) -> None:
        MPI = self._MPI
        status = MPI.Status()
        while self._roll.Iprobe(source=MPI.ANY_SOURCE, tag=self._ASK, status=status):
            asked = np.empty(1, dtype=np.int64)
            self._roll.Recv(asked, source=status.Get_source(), tag=self._ASK)
            answer = np.array([self._seq], dtype=np.int64)
            send = self._roll.Isend(answer, dest=status.Get_source(), tag=self._ANSWER)
            self._pending_sends.append((answer, send))

    def _timed_out(self, what: str) -> None:
        MPI = self._MPI
        ask = np.array([self._seq], dtype=np.int64)
        others = [r for r in range(self.world_size) if r != self.rank]
        for r in others:
            self._pending_sends.append((ask, self._roll.Isend(ask, dest=r, tag=self._ASK)))
        heard: dict[int, int] = {}
        end = time.monotonic() + min(ROLL_CALL_GRACE_S, self.timeout_s)
        status = MPI.Status()
        while len(heard) < len(others) and time.monotonic() < end:
            self._answer_roll_calls()
            while self._roll.Iprobe(source=MPI.ANY_SOURCE, tag=self._ANSWER, status=status):
                got = np.empty(1, dtype=np.int64)
                self._roll.Recv(got, source=status.Get_source(), tag=self._ANSWER)
                heard[status.Get_source()] = int(got[0])
            time.sleep(0.01)
        waiting = sorted([self.rank] + [r for r, seq in heard.items() if seq == self._seq])
        missing = [r for r in others if r not in waiting]
        raise CollectiveTimeout(_missing_message(what, self._seq, self.timeout_s, missing, waiting), waiting[0])

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(x, dtype=np.float64)
        out = np.empty_like(send)
        self.bytes_sent += send.nbytes
        self._wait(self._comm.Iallreduce(send, out, op=self._MPI.SUM), "all-reduce")
        return out

    def allgather(self, payload: bytes) -> list[bytes]:
        # Raw buffers, not mpi4py's pickled objects, so the byte count is exact.
        n = np.array([len(payload)], dtype=np.int64)
        sizes = np.empty(self.world_size, dtype=np.int64)
        self._wait(self._comm.Iallgather(n, sizes), "all-gather")
        width = int(sizes.max())
        self.bytes_sent += LENGTH_BYTES + width
        if width == 0:
            return [b""] * self.world_size
        send = np.zeros(width, dtype=np.uint8)
        send[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
        recv = np.empty(width * self.world_size, dtype=np.uint8)
        self._wait(self._comm.Iallgather(send, recv), "all-gather")
        return [recv[r * width: r * width + int(sizes[r])].tobytes() for r in range(self.world_size)]

    def barrier(self) -> None:
        self._wait(self._comm.Ibarrier(), "barrier")

    def abort(self, code: int = 1) -> None:
        sys.stderr.flush()
        sys.stdout.flush()
        self._comm.Abort(code)


class TorchComm(Comm):
    """torch.distributed (gloo) with the same bound as MPI: collectives run asynchronously and are polled
    against ``dist.timeout_s``.  A rank that has waited a moment records the collective it waits in under
    ``hpc_es/at/<rank>`` in the launch's key-value store, so on a timeout the error names the rank(s) that
    never arrived rather than the one that gave up waiting."""

    name = "torch"

    def __init__(self, timeout_s: float = 600.0) -> None:
        super().__init__()
        import torch.distributed as dist

        env = os.environ
        if "RANK" not in env and "SLURM_PROCID" in env:  # srun without torchrun: derive env:// variables
            env.setdefault("RANK", env["SLURM_PROCID"])
            env.setdefault("WORLD_SIZE", env.get("SLURM_NTASKS", "1"))
            env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
            env.setdefault("MASTER_ADDR", _first_slurm_host())
            env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 2000))
        for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if key not in env:
                raise DistributedError(f"dist.backend=torch needs {key} (launch with torchrun or srun)")
        self._dist = dist
        self.timeout_s = timeout_s
        # gloo's own limit sits past ours, so the roll call below (not a bare gloo timeout) reports a hang.
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s + 2 * ROLL_CALL_GRACE_S + 30))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.local_size = int(env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])
        self._seq = 0
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            self._store: Any = _get_default_store()
        except (ImportError, RuntimeError, ValueError):  # no store to hold a roll call: the bound still holds
            self._store = None

    def _wait(self, work: Any, what: str) -> None:
        self._seq += 1
        start = time.monotonic()
        pause = 20e-6
        recorded = False
        while not work.is_completed():
            now = time.monotonic()
            if not recorded and now - start >= ROLL_CALL_AFTER_S:
                self._record()
                recorded = True
            if now - start >= self.timeout_s:
                self._timed_out(what)
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX_S)
        work.wait()  # raises what the collective hit (a lost peer, ...)

    def _record(self) -> None:
        if self._store is not None and self.world_size > 1:
            try:
                self._store.set(f"hpc_es/at/{self.rank}", str(self._seq))
            except (RuntimeError, OSError):
                pass

    def _timed_out(self, what: str) -> None:
        waiting, missing = [self.rank], []
        if self._store is not None:
            self._record()
            keys = {r: f"hpc_es/at/{r}" for r in range(self.world_size) if r != self.rank}
            end = time.monotonic() + min(ROLL_CALL_GRACE_S, self.timeout_s)
            while True:
                try:
                    arrived = [r for r, k in keys.items() if self._store.check([k])
                               and int(self._store.get(k)) == self._seq]
                except (RuntimeError, OSError, ValueError):
                    arrived = []
                if len(arrived) == len(keys) or time.monotonic() >= end:
                    break
                time.sleep(0.05)
            waiting = sorted([self.rank] + arrived)
            missing = [r for r in keys if r not in arrived]
            message = _missing_message(what, self._seq, self.timeout_s, missing, waiting)
        else:
            message = f"{what} #{self._seq} did not complete within dist.timeout_s={self.timeout_s:g} s"
        raise CollectiveTimeout(message, waiting[0])

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).copy())
        self.bytes_sent += t.numel() * 8
        self._wait(self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, async_op=True), "all-reduce")
        return t.numpy()

    def allgather(self, payload: bytes) -> list[bytes]:
        # Plain tensors, not all_gather_object (pickles), so the byte count is exact.
        import torch

        n = torch.tensor([len(payload)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._wait(self._dist.all_gather(sizes, n, async_op=True), "all-gather")
        width = max(int(x.item()) for x in sizes)
        self.bytes_sent += LENGTH_BYTES + width
        if width == 0:
            return [b""] * self.world_size
        send = torch.zeros(width, dtype=torch.uint8)
        if payload:
            send[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        recv = [torch.empty_like(send) for _ in range(self.world_size)]
        self._wait(self._dist.all_gather(recv, send, async_op=True), "all-gather")
        return [bytes(recv[r][: int(sizes[r].item())].numpy()) for r in range(self.world_size)]

    def barrier(self) -> None:
        self._wait(self._dist.barrier(async_op=True), "barrier")

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


@dataclass
class Exchanged:
    """What one iteration's all-reduce carried: the N rewards and two flags of control."""

    rewards: np.ndarray  # float64[N]: each member's reward, summed from the one rank that owns it
    failed: int  # number of ranks whose member scoring raised
    stopping: int  # number of ranks asked by a signal to stop after this iteration


def exchange_rewards(comm: Comm, local: np.ndarray, failed: bool, stopping: bool) -> Exchanged:
    """The one collective of an iteration: rewards (zeros where another rank owns the member) plus a
    "failed" and a "stop" count, in one float64 all-reduce of N + 2 values, so that a failure or a
    signal on any rank reaches every rank in the same iteration without a second round trip."""
    n = len(local)
    send = np.zeros(n + 2, dtype=np.float64)
    send[:n] = local
    send[n] = 1.0 if failed else 0.0
    send[n + 1] = 1.0 if stopping else 0.0
    total = comm.allreduce_sum(send)
    return Exchanged(rewards=total[:n], failed=int(total[n]), stopping=int(total[n + 1]))


class SetupFailed(DistributedError):
    """Setup failed on one or more ranks and every rank knows it (see ``agree``): all exit, none aborts."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def attempt(step: Callable[[], None]) -> Exception | None:
    """Run one setup step; its error, if any, for ``agree``."""
    try:
        step()
    except Exception as e:  # noqa: BLE001 (handed to agree, which re-raises it on every rank)
        return e
    return None


def agree(comm: Comm, error: Exception | None) -> None:
    """Close a setup step: a collective that every rank reaches whether or not its part failed.

    Each rank contributes its error (or nothing); if any rank failed, every rank raises ``SetupFailed``
    with all the messages, so no rank is left waiting in a later collective and nobody has to abort the
    job.  An error that every rank hit alike (a bad model dir, a run_dir that cannot be resumed) reads as
    it would in one process; otherwise the message names the ranks.  One process: ``error`` is re-raised.
    """
    if comm.world_size == 1:
        if error is not None:
            raise error
        return
    payload = b""
    if error is not None:
        code = error.exit_code if isinstance(error, HpcEsError) else 1
        text = str(error) if isinstance(error, HpcEsError) else f"{type(error).__name__}: {error}"
        payload = json.dumps([code, text]).encode()
    failed = {r: json.loads(p) for r, p in enumerate(comm.allgather(payload)) if p}
    if not failed:
        return
    texts = {text for _, text in failed.values()}
    if len(failed) == comm.world_size and len(texts) == 1:
        message = texts.pop()
    else:
        message = "; ".join(f"rank {r} failed: {text}" for r, (_, text) in sorted(failed.items()))
    raise SetupFailed(message, failed[min(failed)][0]) from error


@contextmanager
def agreement(comm: Comm) -> Iterator[None]:
    """A set-up step written as a block: ``with agreement(comm): ...`` runs it, then ``agree``s on its error (or
    on none), so that every rank reaches the collective whether or not its own part failed."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (agree re-raises it, or what the ranks' errors add up to, on every rank)
        agree(comm, e)
        raise
    agree(comm, None)


def _first_slurm_host() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "localhost"
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodes.split(",")[0]


_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD")


def launcher_rank() -> int | None:
    """This process's rank as the launcher's environment tells it, before any communicator exists."""
    for key in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "RANK"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return None


def detect_backend() -> str:
    """An MPI launch (mpirun, srun --mpi=pmix/pmi2) -> mpi; torchrun -> torch; else none."""
    env = os.environ
    if any(k in env for k in _MPI_VARS):
        return "mpi"
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env):
        return "torch"
    return "none"


def make_comm(backend: str = "auto", timeout_s: float = 600.0) -> Comm:
    chosen = detect_backend() if backend == "auto" else backend
    if chosen == "mpi":
        return MPIComm(timeout_s)
    if chosen == "torch":
        return TorchComm(timeout_s)
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and backend == "auto" and "SLURM_PROCID" in os.environ:
        raise DistributedError(
            f"this is task {os.environ['SLURM_PROCID']} of {os.environ['SLURM_NTASKS']} Slurm tasks but no MPI "
            "or torch.distributed launch was detected; use srun --mpi=pmix (Open MPI) or --mpi=pmi2 (MPICH), "
            "or set dist.backend")
    return Comm()
