"""User code cannot forge the outcome of a run (issue 24): an exit, a GeneratorExit or a KeyboardInterrupt
raised by task code, rewards too large to add up, a reward that edits its example; and a run ended by
``os._exit`` in a reward is told apart by the launcher."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PY, ROOT, SMALL, user_task
from hpc_es.cli import main
from hpc_es.errors import TaskError
from hpc_es.tasks import Example, mean_reward, safe_score


def errors(capsys: pytest.CaptureFixture) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hpc_es: error:")]


@pytest.mark.parametrize("code", ["0", "3"])
def test_sys_exit_at_task_import_is_a_task_error(code: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / f"exits{code}.py"
    f.write_text(f"import sys\nsys.exit({code})\n")
    assert main(SMALL + [f"task={f}:task", f"run_dir={tmp_path / 'r'}"]) == 2
    assert errors(capsys) == [f"hpc_es: error: task file '{f}' called sys.exit({code}) while being imported"]


def test_sys_exit_in_a_task_factory_is_a_task_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "factory.py"
    f.write_text("import sys\ndef make(cfg):\n    sys.exit(3)\n")
    assert main(SMALL + [f"task={f}:make", f"run_dir={tmp_path / 'r'}"]) == 2
    assert errors(capsys) == [f"hpc_es: error: task '{f}:make': calling make(cfg) called sys.exit(3)"]


def test_builtins_exit_as_a_task_does_not_print_the_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(SMALL + ["task=builtins:exit", f"run_dir={tmp_path / 'r'}"]) == 2
    out = capsys.readouterr()
    assert "Config(" not in out.err + out.out
    assert [ln for ln in out.err.splitlines() if ln.startswith("hpc_es: error:")] == [
        "hpc_es: error: task 'builtins:exit': calling exit(cfg) called sys.exit(a Config)"]


@pytest.mark.parametrize("body, words", [
    ("raise GeneratorExit", "reward raised GeneratorExit on prompt 'Q: hi\\nA:'"),
    ("raise KeyboardInterrupt", "reward raised KeyboardInterrupt on prompt 'Q: hi\\nA:' (not a Ctrl-C)"),
    ("return 10**400", "reward returned an integer too large for a float on prompt 'Q: hi\\nA:'"),
    ("return 1e308", "rewards (up to 1e+308) on prompt 'Q: hi\\nA:' and 1 more add up beyond a float's range; "
                     "keep rewards well below 1e300"),
])
def test_rewards_that_would_forge_the_outcome_are_task_errors(body: str, words: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "forge.py"
    f.write_text(user_task(body))
    assert main(SMALL + [f"task={f}:task", f"run_dir={tmp_path / 'r'}", "es.iterations=1"]) == 2
    assert errors(capsys) == [f"hpc_es: error: task 'user' {words}"]
    assert not (tmp_path / "r" / "log.h5").exists()


class Mutating:
    name = "mutating"

    def score(self, completion: str, example: Example) -> float:
        example.info["calls"] = example.info.get("calls", 0) + 1
        return float(example.info["calls"])


def test_each_reward_call_sees_the_example_as_given() -> None:
    ex = Example("Q", {"calls": 0})
    assert [safe_score(Mutating(), "c", ex) for _ in range(3)] == [1.0, 1.0, 1.0]  # type: ignore[arg-type]
    assert ex.info == {"calls": 0}


def test_mean_reward_is_np_mean_when_finite() -> None:
    rewards = [0.1, 0.2, 0.3]
    assert mean_reward(Mutating(), rewards, [Example("Q")] * 3) == float(np.mean(rewards))  # type: ignore[arg-type]
    with pytest.raises(TaskError):
        mean_reward(Mutating(), [1e308, 1e308], [Example("Q")] * 2)  # type: ignore[arg-type]


def launch(tmp_path: Path, extra: list[str]) -> subprocess.CompletedProcess:
    """slurm/common.sh's hpc_es_launch with an ``srun`` that runs the command as one local rank."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    run = tmp_path / "run"
    run.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = (f'source slurm/common.sh; HPC_ES_PYTHON={PY}; HPC_ES_MPI=none; HPC_ES_RUN_DIR={run}; '
              f'HPC_ES_ARGS=({" ".join(SMALL + ["es.iterations=1", f"run_dir={run}"] + extra)}); hpc_es_launch')
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_the_launcher_tells_a_run_ended_by_os_exit_from_one_that_finished(tmp_path: Path) -> None:
    f = tmp_path / "quits.py"
    f.write_text(user_task("import os; os._exit(0)"))
    proc = launch(tmp_path / "a", [f"task={f}:task"])
    assert proc.returncode == 1, proc.stderr
    assert "hpc_es: error: the ranks exited 0 without hpc_es's summary line: the run did not finish" in proc.stderr
    proc = launch(tmp_path / "b", [])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b" / "run" / ".hpc_es-summary").read_text() == proc.stdout.splitlines()[-1] + "\n"




class Interrupting:
    name = "interrupting"

    def score(self, completion: str, example: Example) -> float:
        raise KeyboardInterrupt


def test_without_the_clis_handler_a_keyboard_interrupt_stays_one() -> None:
    """In a notebook (Python's own SIGINT handler) a Ctrl-C and a reward's KeyboardInterrupt look alike: interrupt."""
    import signal

    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            safe_score(Interrupting(), "c", Example("Q"))  # type: ignore[arg-type]
    finally:
        signal.signal(signal.SIGINT, saved)
