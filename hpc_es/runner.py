"""One entry for a training run, shared by ``python -m hpc_es`` and the submitit job.

It sets up logging (rank 0 informs, the others speak only of errors), installs the signal handlers when
the caller owns the process (the CLI; under submitit, submitit's SIGUSR2 handler stays), trains, and on a
failure makes sure no rank is left waiting in a collective: an error that every rank saw (a
``DistributedError``, including a set-up error every rank hit) is reported once by rank 0 and every rank
leaves without an abort; an error of one rank is reported by that rank, which then aborts the job.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Callable

from hpc_es.comm import Comm
from hpc_es.config import Config
from hpc_es.errors import DistributedError, HpcEsError
from hpc_es.trainer import Stop, Trainer, train
from hpc_es.watchdog import CTRL_C, watchdog

EXIT_REQUEUE = 75  # checkpointed on a signal: the launcher should requeue (EX_TEMPFAIL)

log = logging.getLogger("hpc_es")


def quiet_libraries() -> None:
    """No hub access, no tokenizer fork warnings, no transformers chatter on every rank."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def setup_logging(comm: Comm) -> None:
    """``hpc_es: ...`` lines on stderr from our logger only (submitit's keeps its own format)."""
    handler = next((h for h in log.handlers if isinstance(h, logging.StreamHandler) and getattr(h, "_hpc_es", False)),
                   None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("hpc_es: %(message)s"))
        handler._hpc_es = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False
    handler.stream = sys.stderr  # tests swap sys.stderr between runs in one process
    log.setLevel(logging.INFO if comm.is_main else logging.ERROR)


def signal_handlers(comm: Comm, grace_s: float) -> Callable[[Trainer], None]:
    """SIGTERM/SIGUSR1/SIGUSR2: finish the iteration, checkpoint, exit 75; a second signal: leave now.

    The handlers go in at once, before the model loads: a signal during set-up (a job preempted while a
    7B model loads) exits 75 with nothing to save, so the scheduler requeues it.  Once training runs, the
    iteration in flight gets ``grace_s`` (checkpoint.stop_grace_s) to end; if it is stuck, the watchdog
    leaves with 75 without it (every completed iteration is in the ledger).  Returns the hook that hands
    the handlers the trainer once it exists.
    """
    held: list[Trainer] = []

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if not held:
            if comm.is_main:
                print(f"hpc_es: got {name} while setting up; nothing to save yet; exit {EXIT_REQUEUE} (requeue "
                      "to resume)", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_REQUEUE)
        trainer = held[0]
        if trainer.stop_signal:  # a second signal (a launcher tearing the job down): leave now
            print(f"hpc_es: rank {comm.rank}: second {name}, exiting without checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        trainer.stop_signal = signum
        watchdog().arm_stop(grace_s, f"hpc_es: rank {comm.rank}: the iteration in flight did not end within "
                                     f"checkpoint.stop_grace_s={grace_s:g} s of {name}; leaving without it; exit "
                                     f"{EXIT_REQUEUE} (the resumed run repeats it)")
        if comm.is_main:
            print(f"\nhpc_es: got {name}; checkpointing after this iteration", file=sys.stderr, flush=True)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    signal.signal(signal.SIGINT, _ctrl_c)
    if not _RESET_IN_CHILD:  # a process that reward code forks is not the run: a signal ends it plainly
        os.register_at_fork(after_in_child=_default_handlers)
        _RESET_IN_CHILD.append(True)
    return held.append


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1)
_RESET_IN_CHILD: list[bool] = []


def _ctrl_c(_signum: int, _frame: Any) -> None:
    """Ctrl-C as Python's own handler does it, marked as the user's (a reward's KeyboardInterrupt is not)."""
    CTRL_C.set()
    raise KeyboardInterrupt


def _default_handlers() -> None:
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # forked from a thread other than the main one: nothing to reset there
        pass


def run_training(cfg: Config, comm: Comm, *, own_process: bool) -> dict[str, Any]:
    """Train on ``comm``'s ranks; the result as a dict (every rank returns the same).

    ``own_process``: the CLI, which installs signal handlers and ends a failed run with ``os._exit`` once
    every rank knows; under submitit (False) submitit's handlers stay and errors are raised to it.
    Raises ``Stop`` after a signal's checkpoint (exit 75: requeue).
    """
    setup_logging(comm)
    try:
        result = train(cfg, comm, on_signal=signal_handlers(comm, cfg.checkpoint.stop_grace_s) if own_process else None)
    except Stop as s:
        if comm.is_main:
            print(f"hpc_es: checkpointed after {signal.Signals(s.signum).name}; exit {EXIT_REQUEUE} "
                  "(requeue to resume)", file=sys.stderr, flush=True)
        comm.barrier()  # every rank stops in the same iteration; none tears down under another
        comm.close()
        raise
    except BaseException as e:
        leave_together(comm, e, exit_process=own_process)
        raise
    out = {"run_dir": result.run_dir, "final_dir": result.final_dir, "iterations": result.iterations,
           "fingerprint": result.fingerprint, "world_size": comm.world_size,
           "reward_mean_first": result.reward_mean_first, "reward_mean_last": result.reward_mean_last}
    comm.close()
    return out


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def leave_together(comm: Comm, exc: BaseException, *, exit_process: bool) -> None:
    """A rank that fails outside a collective must not leave the others waiting in one."""
    if comm.world_size <= 1:
        return
    if isinstance(exc, KeyboardInterrupt) and exit_process:  # Ctrl-C reaches every rank: leave as one process does
        if comm.is_main:
            print("hpc_es: interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    if isinstance(exc, DistributedError):  # every rank saw it: rank 0 reports, all leave, none aborts
        # (a collective timeout is reported by the lowest rank that waited: the hung one may be rank 0)
        if comm.rank == getattr(exc, "reporter", 0):
            print(f"hpc_es: error: {exc}", file=sys.stderr, flush=True)
        exc.quiet = True  # said once already
        comm.close()
        if exit_process:
            os._exit(exc.exit_code)
        return
    if isinstance(exc, SystemExit) and not exit_process:  # submitit's own way out (requeue)
        return
    kind = "" if isinstance(exc, HpcEsError) else f"{type(exc).__name__}: "
    text = str(exc)
    if any(m in text for m in _PEER_LOST):  # a symptom: the cause is printed by the rank that failed
        print(f"hpc_es: rank {comm.rank} stopping: lost contact with another rank ({text.strip()[:120]})",
              file=sys.stderr, flush=True)
    else:
        print(f"hpc_es: error: rank {comm.rank} failed: {kind}{text}", file=sys.stderr, flush=True)
    comm.abort(exc.exit_code if isinstance(exc, HpcEsError) else 1)
