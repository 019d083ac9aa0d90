"""hpc_es replaces or removes only what it wrote (issue 24): model folders, checkpoints, TensorBoard folders
and their leftovers are checked before anything is touched, and the run or replay is refused, naming the path."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SMALL
from hpc_es import checkpoint as ckpt
from hpc_es import ownership
from hpc_es.comm import Comm
from hpc_es.config import load_config
from hpc_es.fsio import MODEL_MARKER
from hpc_es.ownership import NotOurs
from hpc_es.replay import replay
from hpc_es.trainer import train


class FakeModel:
    def save_pretrained(self, folder: str) -> None:
        (Path(folder) / "model.safetensors").write_text("w")


def test_replay_refuses_to_remove_a_folder_beside_out(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "victim.old").mkdir()
    (tmp_path / "victim.old" / "important.txt").write_text("x")
    with pytest.raises(NotOurs, match=r"victim\.old' holds 'important\.txt', which hpc_es did not write"):
        replay(str(tmp_path / "run"), str(tmp_path / "victim"))
    assert (tmp_path / "victim.old" / "important.txt").read_text() == "x"


def test_replay_refuses_the_runs_own_final(tmp_path: Path) -> None:
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / MODEL_MARKER).write_text("")
    with pytest.raises(Exception, match="is the run's own final model"):
        replay(str(tmp_path / "run"), str(tmp_path / "run" / "final"))


def test_a_model_save_never_removes_a_foreign_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "m"
    ckpt.save_model_folder(FakeModel(), FakeModel(), str(out))
    (tmp_path / "m.old").mkdir()
    (tmp_path / "m.old" / "notes.txt").write_text("x")
    with pytest.raises(NotOurs):
        ckpt.save_model_folder(FakeModel(), FakeModel(), str(out))
    assert (tmp_path / "m.old" / "notes.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.old"]  # no temporary folder left


@pytest.mark.parametrize("where", ["final/thesis.tex", "final.old/a.txt", "checkpoint.old/a.txt",
                                   "checkpoint/thesis.tex", "checkpoint.tmp-7/a.txt", "final.tmp-7/a.txt",
                                   "tensorboard/notes.txt", "tensorboard.old-7/a.txt"])
def test_training_refuses_user_content_before_the_model_loads(tmp_path: Path, where: str) -> None:
    run = tmp_path / "ft"
    (run / where).parent.mkdir(parents=True)
    (run / where).write_text("x")
    cfg = load_config(None, SMALL + [f"run_dir={run}", "es.iterations=2", "log.tensorboard=true"])
    with pytest.raises(NotOurs) as e:
        train(cfg, Comm())
    folder, name = where.split("/")
    assert f"'{run / folder}' holds '{name}', which hpc_es did not write" in str(e.value)
    assert (run / where).read_text() == "x"
    assert sorted(p.name for p in run.iterdir()) == sorted([".lock", folder])


def test_own_folders_are_recognised(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoint"
    ck.mkdir()
    for name in ("state.json", "model.safetensors", "log.h5"):
        (ck / name).write_text("")
    tb = tmp_path / "tensorboard"
    tb.mkdir()
    (tb / "events.out.tfevents.1.hpc_es.2").write_text("")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / MODEL_MARKER).write_text("")
    (tmp_path / "final" / "config.json").write_text("")
    (tmp_path / "final.old").mkdir()  # empty: nothing to lose
    ownership.check_run_dir(str(tmp_path), tensorboard=True)
    (ck / "link").symlink_to(tmp_path / "final")
    with pytest.raises(NotOurs, match="holds 'link'"):
        ownership.check_run_dir(str(tmp_path), tensorboard=True)


def test_stale_final_temporaries_are_cleaned(tmp_path: Path) -> None:
    """A kill during the final save leaves final.tmp-PID (marked first): resume removes it like checkpoint.tmp-*."""
    stale = tmp_path / "final.tmp-123"
    stale.mkdir()
    (stale / MODEL_MARKER).write_text("")
    (stale / "model.safetensors").write_text("half")
    foreign = tmp_path / "final.tmp-456"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    assert ckpt.clean_stale(str(tmp_path)) == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.tmp-456"]


# ---- no write follows a link out of run_dir ---------------------------------------------------------

def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    from hpc_es import runlock
    from hpc_es.fsio import FileSystemError

    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(elsewhere)
    with pytest.raises(FileSystemError, match="is a symbolic link"):
        runlock.acquire(str(tmp_path / "run"))
    assert elsewhere.read_text() == "keep"


def test_the_ledger_temporary_never_follows_a_link(tmp_path: Path) -> None:
    from hpc_es.ledger import Ledger

    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("keep")
    (tmp_path / "log.h5.tmp").symlink_to(elsewhere)
    Ledger(4, {"config": "{}"}).save(str(tmp_path / "log.h5"))
    assert elsewhere.read_text() == "keep"
    assert (tmp_path / "log.h5").is_file() and not (tmp_path / "log.h5").is_symlink()
    assert len(Ledger.load(str(tmp_path / "log.h5"))) == 0


@pytest.mark.parametrize("name", ["log.h5.tmp", "log.h5"])
def test_training_refuses_symlinked_own_files(tmp_path: Path, name: str) -> None:
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("keep")
    run = tmp_path / "ft"
    run.mkdir()
    (run / name).symlink_to(elsewhere)
    with pytest.raises(NotOurs, match=f"'{run / name}' is a link or not a plain file"):
        train(load_config(None, SMALL + [f"run_dir={run}", "es.iterations=2"]), Comm())
    assert elsewhere.read_text() == "keep"


# ---- a reward that changes the working directory -------------------------------------------------------

def test_a_reward_that_changes_directory_writes_nothing_elsewhere(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import user_task

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    task = tmp_path / "wander.py"
    task.write_text(user_task(f"import os; os.chdir({str(elsewhere)!r}); return 1.0"))
    monkeypatch.chdir(tmp_path)
    result = train(load_config(None, SMALL + ["run_dir=ft", "es.iterations=2", f"task={task}:task"]), Comm())
    assert list(elsewhere.iterdir()) == []
    assert result.run_dir == str(tmp_path / "ft")
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == [".lock", "checkpoint", "final", "log.h5"]
