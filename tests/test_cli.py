"""Bad input ends with one clear message naming the cause, a non-zero exit, no traceback, no half-written file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import TINY, run_hpc_es, user_task
from hpc_es.cli import main

FAST = TINY + ["es.iterations=1"]


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_clean_failure(code: int, err: str, *words: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("hpc_es: error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_missing_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run_main(FAST + [f"model={tmp_path / 'nope'}", f"run_dir={tmp_path / 'r'}"], capsys)
    assert_clean_failure(code, err, "nope", "does not exist")
    assert not (tmp_path / "r" / "log.h5").exists()


def test_model_dir_without_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "m").mkdir()
    code, err = run_main(FAST + [f"model={tmp_path / 'm'}", f"run_dir={tmp_path / 'r'}"], capsys)
    assert_clean_failure(code, err, "config.json")


def test_model_path_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "m").write_text("x")
    code, err = run_main(FAST + [f"model={tmp_path / 'm'}", f"run_dir={tmp_path / 'r'}"], capsys)
    assert_clean_failure(code, err, "not a directory")


def test_broken_model_weights(tmp_path: Path, tiny_model_dir: str, capsys: pytest.CaptureFixture) -> None:
    import shutil

    m = tmp_path / "m"
    shutil.copytree(tiny_model_dir, m)
    (m / "model.safetensors").write_bytes(b"garbage")
    code, err = run_main(FAST + [f"model={m}", f"run_dir={tmp_path / 'r'}"], capsys)
    assert_clean_failure(code, err, "cannot load model", str(m))


def test_malformed_data_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "data.json"
    bad.write_text('[{"numbers": [1, 2, 3], "target": "6"}, {"numbers": "x"}')
    code, err = run_main(FAST + ["task=countdown", f"data.path={bad}", f"run_dir={tmp_path / 'r'}"], capsys)
    assert_clean_failure(code, err, "data.json")
    assert not (tmp_path / "r" / "log.h5").exists()


@pytest.mark.parametrize("override, words", [
    ("es.sigma=0", ["es.sigma", "> 0"]),
    ("es.population_size=0", ["es.population_size", ">= 2"]),
    ("es.sigmaa=1", ["es.sigmaa", "es.sigma"]),
    ("es.iterations=many", ["es.iterations", "integer"]),
])
def test_bad_config_values(override: str, words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run_main(FAST + [override, f"run_dir={tmp_path / 'r'}"], capsys)
    assert_clean_failure(code, err, *words)
    assert not (tmp_path / "r").exists()


def test_unknown_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run_main(FAST + ["task=chess", f"run_dir={tmp_path / 'r'}"], capsys)
    assert_clean_failure(code, err, "chess")


@pytest.mark.parametrize("body, words", [
    ("raise ZeroDivisionError('my reward broke')", ["my reward broke", "ZeroDivisionError"]),
    ("return float('nan')", ["nan"]),
    ("return 'good'", ["good"]),
])
def test_reward_function_that_fails(body: str, words: list[str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "bad_task.py"
    f.write_text(user_task(body))
    code, err = run_main(FAST + [f"task={f}:task", f"run_dir={tmp_path / 'r'}"], capsys)
    assert_clean_failure(code, err, *words)
    assert not (tmp_path / "r" / "log.h5").exists() and not list((tmp_path / "r").glob("*.tmp*"))


def test_user_task_trains_and_eval_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "ok_task.py"
    f.write_text(user_task("return -float(len(completion))"))
    code, _ = run_main(FAST + [f"task={f}:task", f"run_dir={tmp_path / 'r'}"], capsys)
    assert code == 0 and (tmp_path / "r" / "log.h5").is_file()
    code = main(["eval", "task=countdown", "data.synthetic_size=40", "data.test_size=8", "rollout.batch_size=3",
                 "rollout.max_new_tokens=4", f"model={tmp_path / 'r' / 'final'}"])
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert code == 0 and out["examples"] == 8 and 0.0 <= out["accuracy"] <= 1.0 and out["mean_reward"] >= 0
    done = [ln.split()[2] for ln in captured.err.splitlines() if ln.startswith("hpc_es: eval ")]
    assert done == ["3/8", "6/8", "8/8"], captured.err  # progress after every batch


@pytest.mark.integration
def test_error_in_a_real_process_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_hpc_es(FAST + [f"model={tmp_path / 'absent'}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("hpc_es: error: model directory")
    assert "Traceback" not in proc.stderr


def test_help_lists_subcommands(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("eval", "fingerprint", "replay", "submit"):
        assert cmd in out


def test_unknown_flag(capsys: pytest.CaptureFixture) -> None:
    code, err = run_main(["--sigma", "0.1"], capsys)
    assert_clean_failure(code, err, "--sigma")


@pytest.mark.integration
def test_no_partial_files_in_run_dir_after_success(reference_run: Path) -> None:
    leftovers = [p for p in os.listdir(reference_run) if ".tmp" in p or p.endswith(".old")]
    assert leftovers == []
