"""A ledger is trusted only row by row (issue 24): rows removed, repeated or renumbered by hand are refused
by resume and replay, naming the first bad row, before anything is changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import SMALL
from hpc_es.checkpoint import CheckpointError
from hpc_es.comm import Comm
from hpc_es.config import load_config
from hpc_es.ledger import Ledger
from hpc_es.replay import replay
from hpc_es.trainer import train


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four iterations in the ledger, a checkpoint after two (as a kill before the fourth's checkpoint leaves)."""
    run = tmp_path_factory.mktemp("trust") / "run"
    train(load_config(None, SMALL + [f"run_dir={run}", "es.iterations=2"]), Comm())
    shutil.copytree(run / "checkpoint", run.parent / "at2")
    train(load_config(None, SMALL + [f"run_dir={run}", "es.iterations=4"]), Comm())
    shutil.rmtree(run / "checkpoint")
    shutil.move(run.parent / "at2", run / "checkpoint")
    return run


def edited(finished: Path, tmp_path: Path, rows: list[int]) -> Path:
    """A copy of the run whose log.h5 holds the rows ``rows`` (in that order), renumbered 0.."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ledger = Ledger.load(str(run / "log.h5"))
    ledger.rows = [{**ledger.rows[i], "iteration": t} for t, i in enumerate(rows)]
    ledger.save(str(run / "log.h5"))
    return run


@pytest.mark.parametrize("rows, first_bad", [([0, 2, 3], 1), ([0, 1, 1, 2], 2), ([1, 0, 2, 3], 0)])
def test_resume_refuses_renumbered_rows(finished: Path, tmp_path: Path, rows: list[int], first_bad: int) -> None:
    run = edited(finished, tmp_path, rows)
    before = (run / "log.h5").read_bytes()
    with pytest.raises(CheckpointError) as e:
        train(load_config(None, SMALL + [f"run_dir={run}", "es.iterations=6"]), Comm())
    assert f"ledger row {first_bad} (iteration {first_bad}) is not one this run wrote: its seeds are not " \
           f"iteration {first_bad}'s" in str(e.value)
    assert (run / "log.h5").read_bytes() == before


def test_replay_refuses_renumbered_rows(finished: Path, tmp_path: Path) -> None:
    run = edited(finished, tmp_path, [0, 2, 3])
    with pytest.raises(CheckpointError, match="ledger row 1 .* is not one this run wrote"):
        replay(str(run), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_row_that_differs_from_the_checkpoint_copy_is_refused(finished: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ledger = Ledger.load(str(run / "log.h5"))
    ledger.rows[1]["shaped"] = ledger.rows[1]["shaped"][::-1].copy()
    ledger.save(str(run / "log.h5"))
    with pytest.raises(CheckpointError, match="ledger row 1 differs from the checkpoint's copy of the ledger"):
        train(load_config(None, SMALL + [f"run_dir={run}", "es.iterations=6"]), Comm())


def test_the_untouched_run_resumes(finished: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert train(load_config(None, SMALL + [f"run_dir={run}", "es.iterations=5"]), Comm()).iterations == 5
