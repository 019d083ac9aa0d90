"""How a run stops: the process's exit codes, the signals that ask a run to stop, and the grace period.

A scheduler ends a job with a signal (Slurm's ``--signal=USR2@180`` before the time limit, SIGTERM on
preemption).  What every rank then does is decided here and nowhere else:

* during set-up (a 7B model loading) nothing can be saved yet: the process leaves at once with
  ``EXIT_REQUEUE``, and the requeued job starts again;
* once training runs, the iteration in flight ends, every rank agrees through the reward exchange to stop
  after it (a signal to one rank reaches all in the same iteration), the trainer checkpoints and the run
  leaves with ``EXIT_REQUEUE``; slurm/common.sh requeues the job on that code and the run resumes;
* if the iteration in flight has not ended ``checkpoint.stop_grace_s`` after the signal (a stuck reward, a
  dead rank), the process leaves with ``EXIT_REQUEUE`` without it: every completed iteration is in the
  ledger and the resumed run repeats the lost one exactly;
* a second signal (a launcher tearing the job down) leaves at once with 128 + the signal's number.

The trainer asks one question after each iteration, :meth:`Stopping.should_stop`.  Under submitit
(``Stopping.install`` not called) submitit's own SIGUSR2 handler checkpoints and requeues instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Callable

# ---- exit codes: every code hpc_es ends a process with (slurm/common.sh relies on EXIT_REQUEUE) -------------
EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected exception: a bug, reported with its traceback
EXIT_USER_ERROR = 2  # bad input (config, data, model folder, a task's reward): one ``hpc_es: error:`` line
EXIT_DISTRIBUTED = 3  # a rank failed, the world size does not fit the population, or ranks diverged
EXIT_REQUEUE = 75  # checkpointed (or nothing to lose) on a signal: requeue to resume (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
EXIT_SIGNAL_BASE = 128  # a second signal: 128 + its number, as a shell reports a process killed by it

SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1)
# Set by the SIGINT handler ``install`` puts in: under it, a KeyboardInterrupt is the user's Ctrl-C only when
# this is set (reward code that raises KeyboardInterrupt itself is the task's error, not an interrupt).
CTRL_C = threading.Event()
_RESET_IN_CHILD: list[bool] = []


class Stopping:
    """This rank's stop state: which signal arrived, whether every rank agreed to stop, the grace deadline.

    ``install`` puts the signal handlers in (the CLI, which owns its process); ``start_training`` marks the
    end of set-up, from which a signal means "checkpoint after this iteration" rather than "leave now".
    """

    def __init__(self, rank: int, world_size: int, grace_s: float) -> None:
        self.rank, self.world_size, self.grace_s = rank, world_size, grace_s
        self.signum = 0  # the first signal this rank got (or SIGTERM once another rank's reached it): 0 = none
        self.agreed = False  # every rank knows, through the reward exchange, to stop after this iteration
        self.training = False  # set-up done: a signal now waits for the iteration in flight
        self.exit: Callable[[int], None] = os._exit  # tests may replace it
        self._deadline: threading.Timer | None = None

    def install(self) -> None:
        """Handle SIGTERM, SIGUSR2 and SIGUSR1 from now on (before the model loads, so that set-up is covered)."""
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGINT, _ctrl_c)
        if not _RESET_IN_CHILD:  # a process that reward code forks is not the run: a signal ends it plainly
            os.register_at_fork(after_in_child=_default_handlers)
            _RESET_IN_CHILD.append(True)

    def start_training(self) -> None:
        self.training = True

    @property
    def signalled(self) -> bool:
        """What this rank tells the others in the reward exchange."""
        return bool(self.signum)

    def agree(self, stopping: int) -> None:
        """The reward exchange's count of signalled ranks: any, and every rank stops after this iteration."""
        if stopping:
            self.agreed = True
            self.signum = self.signum or int(signal.SIGTERM)

    def should_stop(self) -> bool:
        """After an iteration: checkpoint and leave?  Yes once every rank agreed, or at once in a one-rank run
        (nobody to agree with).  A yes also ends the grace deadline: the iteration did end in time."""
        stop = self.agreed or (self.world_size == 1 and self.signalled)
        if stop:
            self._disarm()
        return stop

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    # ---- the handler and the grace deadline -----------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.training:
            self._leave(f"hpc_es: got {name} while setting up; nothing to save yet; exit {EXIT_REQUEUE} "
                        "(requeue to resume)" if self.rank == 0 else "", EXIT_REQUEUE)
            return
        if self.signum:
            self._leave(f"hpc_es: rank {self.rank}: second {name}, exiting without checkpoint",
                        EXIT_SIGNAL_BASE + signum)
            return
        self.signum = signum
        self._arm(f"hpc_es: rank {self.rank}: the iteration in flight did not end within checkpoint.stop_grace_s="
                  f"{self.grace_s:g} s of {name}; leaving without it; exit {EXIT_REQUEUE} (the resumed run "
                  "repeats it)")
        if self.rank == 0:
            print(f"\nhpc_es: got {name}; checkpointing after this iteration", file=sys.stderr, flush=True)

    def _arm(self, message: str) -> None:
        if self._deadline is None:
            self._deadline = threading.Timer(self.grace_s, self._leave, (message, EXIT_REQUEUE))
            self._deadline.daemon = True
            self._deadline.start()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _leave(self, message: str, code: int) -> None:
        try:
            if message:
                print(message, file=sys.stderr, flush=True)
            sys.stdout.flush()
        finally:
            self.exit(code)


def _ctrl_c(_signum: int, _frame: FrameType | None) -> None:
    """Ctrl-C as Python's own handler does it, marked as the user's (a reward's KeyboardInterrupt is not)."""
    CTRL_C.set()
    raise KeyboardInterrupt


def _default_handlers() -> None:
    try:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # forked from a thread other than the main one: nothing to reset there
        pass
