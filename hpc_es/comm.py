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
from dataclasses import dataclass
from typing import Callable

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


class MPIComm(Comm):
    name = "mpi"

    def __init__(self) -> None:
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

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(x, dtype=np.float64)
        out = np.empty_like(send)
        self.bytes_sent += send.nbytes
        self._comm.Allreduce(send, out, op=self._MPI.SUM)
        return out

    def allgather(self, payload: bytes) -> list[bytes]:
        # Raw buffers, not mpi4py's pickled objects, so the byte count is exact.
        n = np.array([len(payload)], dtype=np.int64)
        sizes = np.empty(self.world_size, dtype=np.int64)
        self._comm.Allgather(n, sizes)
        width = int(sizes.max())
        self.bytes_sent += LENGTH_BYTES + width
        if width == 0:
            return [b""] * self.world_size
        send = np.zeros(width, dtype=np.uint8)
        send[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
        recv = np.empty(width * self.world_size, dtype=np.uint8)
        self._comm.Allgather(send, recv)
        return [recv[r * width: r * width + int(sizes[r])].tobytes() for r in range(self.world_size)]

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int = 1) -> None:
        sys.stderr.flush()
        sys.stdout.flush()
        self._comm.Abort(code)


class TorchComm(Comm):
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
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.local_size = int(env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).copy())
        self.bytes_sent += t.numel() * 8
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        return t.numpy()

    def allgather(self, payload: bytes) -> list[bytes]:
        # Plain tensors, not all_gather_object (pickles), so the byte count is exact.
        import torch

        n = torch.tensor([len(payload)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, n)
        width = max(int(x.item()) for x in sizes)
        self.bytes_sent += LENGTH_BYTES + width
        if width == 0:
            return [b""] * self.world_size
        send = torch.zeros(width, dtype=torch.uint8)
        if payload:
            send[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        recv = [torch.empty_like(send) for _ in range(self.world_size)]
        self._dist.all_gather(recv, send)
        return [bytes(recv[r][: int(sizes[r].item())].numpy()) for r in range(self.world_size)]

    def barrier(self) -> None:
        self._dist.barrier()

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
        return MPIComm()
    if chosen == "torch":
        return TorchComm(timeout_s)
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and backend == "auto" and "SLURM_PROCID" in os.environ:
        raise DistributedError(
            f"this is task {os.environ['SLURM_PROCID']} of {os.environ['SLURM_NTASKS']} Slurm tasks but no MPI "
            "or torch.distributed launch was detected; use srun --mpi=pmix (Open MPI) or --mpi=pmi2 (MPICH), "
            "or set dist.backend")
    return Comm()
