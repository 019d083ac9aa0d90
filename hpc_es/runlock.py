"""One run per run_dir: rank 0 holds an flock on ``run_dir/.lock`` for the life of the process.

The kernel drops an flock when its holder dies (kill -9, node loss, OOM), so a lock left by a dead run
never blocks a resume and needs no clean-up; a second live run on the same run_dir is refused at once,
with the holder's host, pid, Slurm job id and start time (written into the lock file) in the message.
An flock belongs to the open file, which a fork shares: a process that reward code forks and leaves
running would keep the lock after the run ends, so a forked child closes its copy at once (and an
exec'd one never gets it: the descriptor is close-on-exec).  When the recorded holder is gone from this
host yet the lock is held, the message says that a process it started holds it.

File systems where flock is not supported (e.g. Lustre mounted without ``-o flock``) give a warning and
the run proceeds unlocked; ``HPC_ES_RUN_LOCK=off`` skips the lock altogether (for file systems whose
flock is known to be unreliable across nodes; then make sure only one run uses a run_dir).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from hpc_es.errors import HpcEsError

LOCK_FILE = ".lock"
ENV_SWITCH = "HPC_ES_RUN_LOCK"  # "off" disables the lock


class RunDirBusy(HpcEsError):
    """Another live run holds run_dir."""


_HELD: set[int] = set()  # this process's lock descriptors, closed in every forked child


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)  # the parent's descriptor (and its lock) is untouched
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The held lock; ``release`` (or process exit) frees it."""

    def __init__(self, path: str, fd: int | None) -> None:
        self.path, self.fd = path, fd
        if fd is not None:
            _HELD.add(fd)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the descriptor drops the flock; the file stays (holder of record)
            self.fd = None


def holder_record() -> dict[str, object]:
    rec: dict[str, object] = {"host": socket.gethostname(), "pid": os.getpid(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        rec["slurm_job_id"] = job
    return rec


def _gone(rec: dict[str, object]) -> bool:
    """The recorded holder ran on this host and has ended."""
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return False
    try:
        os.kill(int(rec["pid"]), 0)  # type: ignore[call-overload]
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def describe_holder(text: str) -> str:
    try:
        rec = json.loads(text)
        parts = [f"host {str(rec['host'])[:100]}", f"pid {str(rec['pid'])[:20]}"]
        if rec.get("slurm_job_id"):
            parts.append(f"Slurm job {str(rec['slurm_job_id'])[:20]}")
        parts.append(f"started {str(rec['started'])[:40]}")
        if _gone(rec):
            return (f"the run that took it ({', '.join(parts)}) has ended, but a process it started still holds "
                    "the lock; end that process (`fuser -v RUN_DIR/.lock` names it)")
        return ", ".join(parts)
    except (ValueError, KeyError, TypeError, AttributeError):
        return "holder unknown"


def acquire(run_dir: str) -> RunLock:
    """Lock ``run_dir`` (which must exist) for this process, or raise RunDirBusy naming the holder."""
    path = os.path.join(run_dir, LOCK_FILE)
    if os.environ.get(ENV_SWITCH, "").lower() in ("off", "0", "false", "no"):
        return RunLock(path, None)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        from hpc_es.fsio import FileSystemError, describe_os_error

        if e.errno == errno.ELOOP:
            raise FileSystemError(f"the run_dir lock '{path}' is a symbolic link; hpc_es writes its own file there "
                                  "and refuses to follow it (remove the link)") from None
        raise FileSystemError(f"cannot create the run_dir lock {describe_os_error(e, path)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            try:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            finally:
                os.close(fd)
            who = describe_holder(holder)
            if who.startswith("the run that took it"):
                raise RunDirBusy(f"run_dir '{run_dir}' is locked: {who.replace('RUN_DIR', run_dir)}") from None
            raise RunDirBusy(f"run_dir '{run_dir}' is in use by another run ({who}); "
                             "wait for it to end or use another run_dir") from None
        os.close(fd)
        print(f"hpc_es: warning: cannot lock run_dir '{run_dir}' ({e.strerror}: this file system has no "
              f"flock); running unlocked, so make sure no other run uses it (set {ENV_SWITCH}=off to "
              "silence this)", file=sys.stderr, flush=True)
        return RunLock(path, None)
    record = (json.dumps(holder_record()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    return RunLock(path, fd)
