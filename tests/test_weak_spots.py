"""The smaller durability rules of issue 24: a changed data file, a prompt longer than the model's positions,
replays that would write non-finite weights or race, and messages that name the real cause."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import SMALL
from hpc_es import fsio, resume
from hpc_es.checkpoint import CheckpointError, save_model_folder
from hpc_es.cli import main
from hpc_es.comm import Comm
from hpc_es.config import load_config
from hpc_es.errors import ConfigError, HpcEsError, TaskError
from hpc_es.ledger import Ledger
from hpc_es.replay import replay
from hpc_es.tasks import load_task
from hpc_es.trainer import train

TASK = '''
from hpc_es.tasks import Example

class T:
    name = "words"
    def train_examples(self):
        return [Example(p, {}) for p in PROMPTS]
    def test_examples(self):
        return self.train_examples()
    def score(self, completion, example):
        return float(len(completion))

task = T()
'''


def task_file(path: Path, prompts: list[str]) -> str:
    path.write_text(f"PROMPTS = {prompts!r}\n" + TASK)
    for name in [m for m in sys.modules if m.startswith("hpc_es_user_task_")]:  # a fresh import, as a new run has
        del sys.modules[name]
    return f"{path}:task"


@pytest.fixture(scope="module")
def run2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished two-iteration run of a user task, and its task spec."""
    root = tmp_path_factory.mktemp("weak")
    spec = task_file(root / "words.py", ["Q: a\nA:", "Q: b\nA:"])
    train(load_config(None, SMALL + [f"run_dir={root / 'run'}", "es.iterations=2", f"task={spec}"]), Comm())
    return root / "run", spec


def test_a_changed_data_file_is_refused_on_resume(run2: tuple[Path, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    finished, spec = run2
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    task_file(Path(spec.rsplit(":", 1)[0]), ["Q: a\nA:", "Q: c\nA:"])
    cfg = load_config(None, SMALL + [f"run_dir={run}", "es.iterations=3", f"task={spec}"])
    with pytest.raises(CheckpointError, match="the task's train examples differ from the ones the run trained on"):
        train(cfg, Comm())
    assert len(Ledger.load(str(run / "log.h5"))) == 2
    monkeypatch.setenv(resume.DATA_CHANGED_ENV, "ok")
    assert train(cfg, Comm()).iterations == 3
    task_file(Path(spec.rsplit(":", 1)[0]), ["Q: a\nA:", "Q: b\nA:"])


def test_a_prompt_beyond_the_models_positions_is_refused_at_setup(tmp_path: Path) -> None:
    cfg = load_config(None, SMALL + [f"run_dir={tmp_path / 'r'}", "rollout.max_new_tokens=1020"])
    with pytest.raises(ConfigError) as e:
        train(cfg, Comm())
    assert "rollout.max_new_tokens=1020" in str(e.value) and "max_position_embeddings=1024" in str(e.value)
    assert not (tmp_path / "r" / "log.h5").exists()


def test_replay_refuses_to_save_non_finite_weights(run2: tuple[Path, str], tmp_path: Path) -> None:
    finished, _ = run2
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ledger = Ledger.load(str(run / "log.h5"))
    config = json.loads(ledger.attrs["config"])
    config["es"]["alpha"] = 1e6  # the largest allowed, and rewards shaped far beyond what shaping gives
    ledger.attrs["config"] = json.dumps(config)
    for row in ledger.rows:
        row["alpha"], row["shaped"] = 1e6, row["shaped"] * 1e300
    ledger.save(str(run / "log.h5"))
    with pytest.raises(HpcEsError, match="replaying 2 iterations of .* gives non-finite weights"):
        replay(str(run), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


class SlowModel:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def save_pretrained(self, folder: str) -> None:
        self.log.append(f"{self.name} start")
        time.sleep(0.3)
        (Path(folder) / "model.safetensors").write_text(self.name)
        self.log.append(f"{self.name} end")


def test_two_saves_to_one_out_take_turns(tmp_path: Path) -> None:
    log: list[str] = []
    out = str(tmp_path / "out")
    threads = [threading.Thread(target=save_model_folder, args=(SlowModel(log, n), SlowModel([], n), out))
               for n in ("a", "b")]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for t in threads:
        t.join()
    assert log == ["a start", "a end", "b start", "b end"]
    assert (tmp_path / "out" / "model.safetensors").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- messages that name the real cause ----------------------------------------------------------------

def test_a_changed_dtype_is_named_not_blamed_on_the_model(tmp_path: Path) -> None:
    was = load_config(None, [f"run_dir={tmp_path}", "dtype=float32"])
    now = load_config(None, [f"run_dir={tmp_path}", "dtype=bfloat16"])
    with pytest.raises(CheckpointError) as e:
        resume.check_same_run("run_dir 'r'", "a" * 64, was.to_json(), now, "b" * 64, "m")
    assert str(e.value) == "run_dir 'r' belongs to a run with different dtype; use a new run_dir or the same settings"


def test_a_dangling_symlink_run_dir_is_named(tmp_path: Path) -> None:
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    with pytest.raises(fsio.FileSystemError) as e:
        fsio.check_writable_dir(str(tmp_path / "run"))
    assert str(e.value) == f"run_dir '{tmp_path / 'run'}' is a symbolic link to '{tmp_path / 'gone'}', which does " \
                           "not exist"


def test_report_out_that_is_a_file_is_named(run2: tuple[Path, str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["report", str(run2[0]), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'file'}' is a file, not a folder (give --out a folder)" in err
    assert "File exists" not in err
    assert (tmp_path / "file").read_text() == "x"


def test_a_task_folder_is_named_as_a_folder(tmp_path: Path) -> None:
    cfg = load_config(None, [f"task={tmp_path}/:task"])
    with pytest.raises(TaskError, match=f"task file '{tmp_path}/' is a folder; give a .py file"):
        load_task(cfg)


