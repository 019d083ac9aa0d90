"""How a run stops (hpc_es/stopping.py): the signal handler's decisions, the grace deadline, and the exit
codes the Slurm scripts rely on.  Whole runs stopped by real signals are in test_durability.py and
test_guards_processes.py."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from hpc_es import stopping as stopping_module
from hpc_es.errors import DistributedError, HpcEsError
from hpc_es.stopping import EXIT_REQUEUE, Stopping

ROOT = Path(__file__).resolve().parent.parent


def test_the_slurm_scripts_use_hpc_es_exit_codes() -> None:
    """slurm/common.sh requeues a job on EXIT_REQUEUE: its copy of each code must be hpc_es's."""
    text = (ROOT / "slurm" / "common.sh").read_text(encoding="utf-8")
    codes = dict(re.findall(r"^(EXIT_\w+)=(\d+)$", text, re.M))
    assert "EXIT_REQUEUE" in codes
    assert {k: int(v) for k, v in codes.items()} == {k: getattr(stopping_module, k) for k in codes}
    for script in (ROOT / "slurm").glob("*.sh"):  # no code spelled as a number (comments may say it)
        code = [line for line in script.read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
        bare = r"\b(?:exit|return|-eq|-ne) [0-9]" if script.name == "common.sh" else r"\b75\b"  # (before sourcing it)
        assert not [line for line in code if re.search(bare, line)], script


def test_error_classes_exit_with_the_codes_of_stopping() -> None:
    assert (HpcEsError.exit_code, DistributedError.exit_code) == (stopping_module.EXIT_USER_ERROR,
                                                                  stopping_module.EXIT_DISTRIBUTED)
    assert len({v for k, v in vars(stopping_module).items() if k.startswith("EXIT_")}) == \
        len([k for k in vars(stopping_module) if k.startswith("EXIT_")]), "two exit codes share a value"


def _stopping(world_size: int = 1, grace_s: float = 60.0, rank: int = 0) -> tuple[Stopping, list[int]]:
    s = Stopping(rank, world_size, grace_s)
    exits: list[int] = []
    s.exit = exits.append
    return s, exits


def test_a_signal_during_set_up_leaves_at_once_with_requeue(capsys: pytest.CaptureFixture) -> None:
    s, exits = _stopping()
    s._on_signal(signal.SIGUSR2, None)
    assert exits == [EXIT_REQUEUE]
    assert capsys.readouterr().err == ("hpc_es: got SIGUSR2 while setting up; nothing to save yet; exit 75 "
                                       "(requeue to resume)\n")
    other, exits = _stopping(rank=1)  # only rank 0 speaks
    other._on_signal(signal.SIGTERM, None)
    assert exits == [EXIT_REQUEUE] and capsys.readouterr().err == ""


def test_one_rank_stops_after_the_iteration_a_second_signal_leaves_now(capsys: pytest.CaptureFixture) -> None:
    s, exits = _stopping()
    s.start_training()
    assert not s.should_stop() and not s.signalled
    s._on_signal(signal.SIGTERM, None)
    assert s.signalled and s.signal_name == "SIGTERM" and exits == []
    assert "hpc_es: got SIGTERM; checkpointing after this iteration" in capsys.readouterr().err
    s._on_signal(signal.SIGUSR1, None)
    assert exits == [128 + signal.SIGUSR1]
    assert "hpc_es: rank 0: second SIGUSR1, exiting without checkpoint" in capsys.readouterr().err
    assert s.should_stop()


def test_several_ranks_stop_only_once_all_agreed() -> None:
    signalled, _ = _stopping(world_size=2)
    quiet, _ = _stopping(world_size=2, rank=1)
    for s in (signalled, quiet):
        s.start_training()
    signalled._on_signal(signal.SIGUSR2, None)
    assert not signalled.should_stop()  # the other rank does not know yet: the next exchange tells it
    count = int(signalled.signalled) + int(quiet.signalled)  # what the reward exchange sums
    for s in (signalled, quiet):
        s.agree(count)
        assert s.should_stop()
    assert (signalled.signal_name, quiet.signal_name) == ("SIGUSR2", "SIGTERM")
    signalled._disarm()


def test_the_grace_deadline_exits_requeue_unless_the_iteration_ends(capsys: pytest.CaptureFixture) -> None:
    s, exits = _stopping(grace_s=0.2)
    s.start_training()
    s._on_signal(signal.SIGTERM, None)
    assert s.should_stop()  # the iteration ended in time: the deadline is off
    time.sleep(0.6)
    assert exits == []
    late, exits = _stopping(grace_s=0.2)
    late.start_training()
    late._on_signal(signal.SIGTERM, None)
    time.sleep(0.8)
    assert exits == [EXIT_REQUEUE]
    assert ("hpc_es: rank 0: the iteration in flight did not end within checkpoint.stop_grace_s=0.2 s of SIGTERM; "
            "leaving without it; exit 75 (the resumed run repeats it)") in capsys.readouterr().err
