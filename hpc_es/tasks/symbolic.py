"""Symbolic equivalence of two math answers by math-verify (sympy), computed in a child process.

Why a child process: sympy evaluates some answers inside one C call that holds the GIL for as long as it
runs (``\\boxed{9^{9^{9^9}}}`` becomes a Python integer power), so neither the reward time limit
(hpc_es/watchdog.py, which interrupts at the next bytecode) nor math-verify's own ``signal.alarm`` timer,
which also needs the main thread, could stop it: the process would hang for as long as it runs (hours).  Here the
calling thread only waits on a pipe in short slices, so the time limit always lands: the child is killed
and the run stops with the usual one-line error.  math-verify's own timers are off for the same reason
(they would also fight the watchdog over SIGALRM).

One child per process, started on first use (or by :func:`start`), shared by the replica threads under
a lock (sympy holds the GIL, so in-process grading would not run in parallel either), and ended when its
pipe closes: when this process exits, however it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
from typing import IO, Any

from hpc_es.errors import TaskError

_POLL_S = 0.05  # the longest the caller sits in one blocking call, so the reward time limit lands promptly

_CHILD = ("import sys; sys.path.insert(0, {root!r}); "
          "from hpc_es.tasks.symbolic import serve; serve()")


def _boxed(answer: str) -> str:
    """math-verify reads an answer most reliably as the content of a ``\\boxed{}``."""
    return "\\boxed{" + answer + "}"


def serve() -> None:
    """The child: read ``[reference, answer]`` JSON lines on stdin, write ``1``/``0`` (or ``E message``) lines."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    try:
        import logging

        # the library warns that its timeouts are off: the parent's time limit replaces them (module docstring)
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        from math_verify import parse, verify
    except Exception as e:
        out.write(f"E cannot import math-verify: {type(e).__name__}: {e}\n".replace("\n", " ").rstrip() + "\n")
        out.flush()
        return
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            reference, answer = json.loads(line)
            gold = parse(_boxed(reference), parsing_timeout=None)
            pred = parse(_boxed(answer), parsing_timeout=None)
            reply = "1" if verify(gold, pred, timeout_seconds=None) else "0"
        except Exception as e:
            reply = "E " + f"{type(e).__name__}: {e}".replace("\n", " ")
        out.write(reply + "\n")
        out.flush()


class Grader:
    """The parent's handle on the child (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    def start(self) -> None:
        """Start the child now (imports take a second or two), so the first reward does not pay for it."""
        self._locked(self._running)

    def equivalent(self, reference: str, answer: str) -> bool:
        """Whether ``answer`` equals ``reference`` as a MATH grader reads them (both LaTeX, without ``\\boxed``)."""
        line = json.dumps([reference, answer]) + "\n"
        return self._locked(lambda: self._ask(line)) == "1"

    def close(self) -> None:
        proc, self._proc, self._buffer = self._proc, None, b""
        if proc is not None:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()

    # ---- internals ----------------------------------------------------------------------------------
    def _locked(self, body: Any) -> Any:
        # A thread waiting here waits at most for the holder's own time limit, which ends the holder's call.
        with self._lock:
            try:
                return body()
            except BaseException:
                self.close()  # a reply may still be on its way, or the child is stuck: never reuse it
                raise

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self.close()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self._proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=root)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        ready = self._reply(self._proc)
        if ready != "ready":
            raise TaskError(f"the math grader did not start: {ready.removeprefix('E ')} "
                            "(task 'math' needs the math-verify package: pip install math-verify)")
        return self._proc

    def _ask(self, line: str) -> str:
        proc = self._running()
        assert proc.stdin is not None
        try:
            proc.stdin.write(line.encode())
            proc.stdin.flush()
        except BrokenPipeError:
            raise TaskError(f"the math grader process ended unexpectedly (exit code {proc.wait()})") from None
        reply = self._reply(proc)
        if reply.startswith("E "):
            raise TaskError(f"the math grader failed: {reply[2:]}")
        return reply

    def _reply(self, proc: subprocess.Popen[bytes]) -> str:
        """The child's next line, read in slices of at most ``_POLL_S`` seconds."""
        stdout: IO[bytes] | None = proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while b"\n" not in self._buffer:
            if not select.select([fd], [], [], _POLL_S)[0]:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise TaskError(f"the math grader process ended unexpectedly (exit code {proc.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")


_GRADER = Grader()
atexit.register(_GRADER.close)


def grader() -> Grader:
    """This process's grader."""
    return _GRADER
