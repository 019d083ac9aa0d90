"""A process that reward code forks does not inherit the run (issue 24): the run_dir lock is not held by
it, its signal handlers are the defaults, and a lock held by such a process is named as one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import fcntl
import pytest

from hpc_es import runlock
from hpc_es.stopping import Stopping


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    lock = runlock.acquire(str(tmp_path))
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # a reward's lingering helper
        os.write(w, b"up")
        time.sleep(30)
        os._exit(0)
    assert os.read(r, 2) == b"up"  # the child runs (its at-fork handlers have run)
    os.close(r)
    os.close(w)
    try:
        lock.release()  # the run ends; its child lives on
        again = runlock.acquire(str(tmp_path))  # the next resume
        assert again.held
        again.release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_forked_child_has_default_signal_handlers() -> None:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    try:
        Stopping(0, 1, 1.0).install()
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        child = os.fork()
        if child == 0:
            ok = all(signal.getsignal(s) == signal.SIG_DFL for s in saved if s != signal.SIGINT)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_lock_held_by_an_inherited_descriptor_is_named_as_such(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that has ended
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                                "started": "2026-01-01T00:00:00"}))
    fd = os.open(tmp_path / ".lock", os.O_RDWR)  # the inherited copy still holding it
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(runlock.RunDirBusy) as e:
            runlock.acquire(str(tmp_path))
        assert f"pid {gone.pid}" in str(e.value)
        assert "has ended, but a process it started still holds the lock" in str(e.value)
        assert f"fuser -v {tmp_path}/.lock" in str(e.value)
    finally:
        os.close(fd)
