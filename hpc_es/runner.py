"""One entry for a training run, shared by ``python -m hpc_es`` and the submitit job.

It sets up logging (rank 0 informs, the others speak only of errors), installs the signal handlers of
hpc_es/stopping.py when the caller owns the process (the CLI; under submitit, submitit's SIGUSR2 handler
stays), trains, and on a
failure makes sure no rank is left waiting in a collective: an error that every rank saw (a
``DistributedError``, including a set-up error every rank hit) is reported once by rank 0 and every rank
leaves without an abort; an error of one rank is reported by that rank, which then aborts the job.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from hpc_es.comm import Comm
from hpc_es.config import Config
from hpc_es.errors import DistributedError, HpcEsError
from hpc_es.stopping import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_REQUEUE, Stopping
from hpc_es.trainer import train

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


def run_training(cfg: Config, comm: Comm, *, own_process: bool) -> dict[str, Any]:
    """Train on ``comm``'s ranks; the result as a dict (every rank returns the same).

    ``own_process``: the CLI, which installs signal handlers and ends a failed run with ``os._exit`` once
    every rank knows; under submitit (False) submitit's handlers stay and errors are raised to it.
    ``exit_code`` is ``EXIT_REQUEUE`` when a signal stopped the run after a checkpoint, else ``EXIT_OK``.
    """
    setup_logging(comm)
    stopping = Stopping(comm.rank, comm.world_size, cfg.checkpoint.stop_grace_s)
    if own_process:
        stopping.install()
    try:
        result = train(cfg, comm, stopping)
    except BaseException as e:
        leave_together(comm, e, exit_process=own_process)
        raise
    if result.stopped:
        if comm.is_main:
            print(f"hpc_es: checkpointed after {stopping.signal_name}; exit {EXIT_REQUEUE} (requeue to resume)",
                  file=sys.stderr, flush=True)
        comm.barrier()  # every rank stops in the same iteration; none tears down under another
    out = {"run_dir": result.run_dir, "final_dir": result.final_dir, "iterations": result.iterations,
           "fingerprint": result.fingerprint, "world_size": comm.world_size,
           "reward_mean_first": result.reward_mean_first, "reward_mean_last": result.reward_mean_last,
           "exit_code": EXIT_REQUEUE if result.stopped else EXIT_OK}
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
        os._exit(EXIT_INTERRUPTED)
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
    comm.abort(exc.exit_code if isinstance(exc, HpcEsError) else EXIT_FAILED)
