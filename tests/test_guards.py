"""Issue 16, in-process: inputs that used to lose a run, hang it or fake success are refused with one line.

(The cases that need real processes — two runs on one run_dir, hung ranks, signals — are in
test_guards_processes.py.)
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import TINY, user_task
from hpc_es import fsio, watchdog as wd
from hpc_es.cli import main
from hpc_es.config import Config, all_keys, get_key, load_config
from hpc_es.errors import ConfigError, DataError, HpcEsError, TaskError
from hpc_es.checkpoint import save_model_folder
from hpc_es.fsio import MODEL_MARKER, FileSystemError, check_model_out
from hpc_es.tasks import Example, safe_score


def refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    return str(e.value)


# ---- case 5, 6, 8: value bounds ---------------------------------------------------------------

def test_every_integer_key_has_an_upper_bound() -> None:
    defaults = Config()
    ints = [k for k in all_keys() if type(get_key(defaults, k)) is int]
    assert "es.population_size" in ints and "rollout.max_new_tokens" in ints
    for key in ints:
        msg = refused([f"{key}=1000000000000000000000000000000"])
        assert f"'{key}'" in msg and "out of range" in msg, msg


@pytest.mark.parametrize("override", ["es.population_size=1e30", "data.synthetic_size=1e12",
                                      "rollout.prompts_per_iteration=1e9", "rollout.max_new_tokens=1e7"])
def test_huge_sizes_are_refused_before_anything_is_allocated(override: str) -> None:
    key = override.split("=")[0]
    assert f"'{key}'" in refused([override])


@pytest.mark.parametrize("key", ["es.alpha", "es.sigma", "dist.timeout_s", "rollout.reward_timeout_s",
                                 "checkpoint.stop_grace_s"])
@pytest.mark.parametrize("value", ["inf", ".inf", "-.inf", "nan", ".nan"])
def test_every_float_key_must_be_finite(key: str, value: str) -> None:
    msg = refused([f"{key}={value}"])
    assert f"'{key}'" in msg and ("finite" in msg or "out of range" in msg), msg


def test_a_population_of_one_is_refused() -> None:
    msg = refused(["es.population_size=1"])
    assert "es.population_size" in msg and ">= 2 and <= 100,000" in msg and "z-scores" in msg


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_bounds_accept_every_shipped_config(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPC_ES_MODELS", "/models")
    monkeypatch.setenv("HPC_ES_DATA", "/data")
    cfg = load_config(str(config))
    assert cfg.es.population_size >= 2 and (cfg.rollout.reward_timeout_s, cfg.checkpoint.stop_grace_s) == (60.0, 60.0)


# ---- case 10: config and data files ------------------------------------------------------------

def test_a_yaml_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes("es:\n  sigma: 0.01  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert str(e.value).startswith(f"config file '{f}' is not UTF-8 text")


@pytest.mark.parametrize("path, words", [("/dev/zero", "not a regular file"), ("/", "is a directory")])
def test_a_config_file_that_is_not_a_regular_file_is_refused(path: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(path)


@pytest.mark.parametrize("task", ["countdown", "conciseness"])
def test_data_path_dev_zero_is_refused_at_once(task: str) -> None:
    from hpc_es.tasks import load_task

    cfg = load_config(None, [f"task={task}", "data.path=/dev/zero"])
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        load_task(cfg)
    assert str(e.value) == "data file '/dev/zero' is not a regular file"
    assert time.monotonic() - t0 < 5


def test_a_data_file_over_the_size_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_es.tasks import countdown, load_task

    f = tmp_path / "big.json"
    f.write_text(json.dumps([{"numbers": [1, 2, 3], "target": 6}] * 100))
    monkeypatch.setattr(countdown, "MAX_DATA_BYTES", 1000)
    with pytest.raises(DataError) as e:
        load_task(load_config(None, ["task=countdown", f"data.path={f}", "data.train_size=4"]))
    assert f"data file '{f}' is {f.stat().st_size:,} bytes, more than the 1,000 allowed" == str(e.value)


# ---- case 3, 7: rewards that never return or exit ----------------------------------------------

class Reward:
    name = "stuck"

    def __init__(self, body: str) -> None:
        self.body = body

    def score(self, completion: str, example: Example) -> float:
        if self.body == "spin":
            while True:
                pass
        if self.body == "sleep":
            time.sleep(600)
        if self.body == "spin-swallowing-exceptions":
            while True:
                try:
                    while True:
                        pass
                except Exception:  # noqa: BLE001, S110 - what a careless reward does
                    pass
        if self.body == "exit0":
            raise SystemExit(0)
        if self.body == "exit-text":
            raise SystemExit("bye")
        return 0.5


@pytest.mark.parametrize("body", ["spin", "sleep", "spin-swallowing-exceptions"])
def test_a_reward_that_never_returns_in_the_main_thread_is_stopped(body: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(TaskError) as e:
        safe_score(Reward(body), "x", Example("What is 2+2?"), timeout_s=0.3)
    assert str(e.value) == ("task 'stuck' reward did not return within 0.3 s on prompt 'What is 2+2?' "
                            "(rollout.reward_timeout_s)")
    assert time.monotonic() - t0 < 3


def test_a_reward_that_never_returns_in_a_worker_thread_is_stopped() -> None:
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(safe_score, Reward("spin"), "x", Example(f"p{i}"), 0.3) for i in range(2)]
        messages = sorted(str(f.exception(timeout=10)) for f in futures)
    assert messages == [f"task 'stuck' reward did not return within 0.3 s on prompt 'p{i}' (rollout.reward_timeout_s)"
                        for i in range(2)]


def test_a_reward_blocked_in_c_code_in_a_worker_thread_ends_the_process(monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """A blocking call outside the main thread cannot be interrupted: the process ends (exit 2) instead."""
    exits: list[int] = []
    dog = wd.watchdog()
    monkeypatch.setattr(dog, "exit", exits.append)
    monkeypatch.setattr(wd, "HARD_EXIT_AFTER_S", 0.2)

    class Blocked(Reward):
        def score(self, completion: str, example: Example) -> float:
            time.sleep(1.5)  # one C call: the asynchronous exception waits for it
            return 1.0

    box: list[BaseException] = []
    th = threading.Thread(target=lambda: box.append(pytest.raises(TaskError, safe_score, Blocked("x"), "x",
                                                                  Example("p"), 0.2).value))
    th.start()
    th.join(10)
    assert exits == [2]
    err = capsys.readouterr().err
    assert ("hpc_es: error: task 'stuck' reward did not return within 0.2 s on prompt 'p' "
            "(rollout.reward_timeout_s) (it did not stop when interrupted; exiting)") in err


@pytest.mark.parametrize("body, words", [("exit0", "sys.exit(0)"), ("exit-text", "sys.exit('bye')")])
def test_a_reward_calling_sys_exit_is_a_task_error(body: str, words: str) -> None:
    with pytest.raises(TaskError) as e:
        safe_score(Reward(body), "x", Example("p"))
    assert str(e.value) == f"task 'stuck' reward called {words} on prompt 'p'"


def test_a_reward_that_returns_in_time_is_untouched() -> None:
    assert safe_score(Reward("ok"), "x", Example("p"), timeout_s=0.05) == 0.5
    time.sleep(0.5)  # a late watchdog tick must not interrupt anything after the call returned
    assert safe_score(Reward("ok"), "x", Example("p"), timeout_s=0) == 0.5


# ---- case 2, 10: model output folders ----------------------------------------------------------

def test_output_folder_rules(tmp_path: Path) -> None:
    check_model_out(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    check_model_out(str(tmp_path / "empty"))
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / MODEL_MARKER).write_text("")
    (tmp_path / "ours" / "model.safetensors").write_text("")
    check_model_out(str(tmp_path / "ours"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.h5").write_text("precious")
    for path, words in ((run, "is not empty and is not a model saved by hpc_es"),
                        (run / "log.h5", "exists and is not a folder"),
                        (tmp_path / "no" / "out", "does not exist")):
        with pytest.raises(FileSystemError) as e:
            check_model_out(str(path))
        assert str(path) in str(e.value) and words in str(e.value), str(e.value)
    assert (run / "log.h5").read_text() == "precious"


class FakeModel:
    def __init__(self, fail: int | None = None) -> None:
        self.fail = fail

    def save_pretrained(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_text("w")
        if self.fail is not None:
            raise OSError(self.fail, "injected", str(Path(folder) / "model.safetensors"))


def test_saving_a_model_marks_it_and_replaces_only_our_folder(tmp_path: Path) -> None:
    out = tmp_path / "m"
    save_model_folder(FakeModel(), FakeModel(), str(out))
    assert sorted(p.name for p in out.iterdir()) == [MODEL_MARKER, "model.safetensors"]
    check_model_out(str(out))  # a later save may replace it
    save_model_folder(FakeModel(), FakeModel(), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "nothing was lost; free space and rerun to resume"),
                                         (errno.EROFS, "injected")])
def test_a_failed_model_save_is_one_line_and_leaves_no_temp_folder(tmp_path: Path, code: int, words: str) -> None:
    out = tmp_path / "m"
    save_model_folder(FakeModel(), FakeModel(), str(out))
    with pytest.raises(FileSystemError) as e:
        save_model_folder(FakeModel(fail=code), FakeModel(), str(out))
    assert str(e.value).startswith("cannot save the model to ") and words in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no .tmp-PID, the old model kept
    assert (out / MODEL_MARKER).exists()


def test_check_writable_dir(tmp_path: Path) -> None:
    fsio.check_writable_dir(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(FileSystemError, match="is a file, not a folder"):
        fsio.check_writable_dir(str(tmp_path / "f"))
    with pytest.raises(FileSystemError, match="Not a directory"):
        fsio.check_writable_dir(str(tmp_path / "f" / "sub"))


# ---- case 9, 13: the command line --------------------------------------------------------------

def test_an_unknown_command_is_named_and_the_commands_listed(capsys: pytest.CaptureFixture) -> None:
    assert main(["bogus", "es.sigma=0.1"]) == 2
    err = capsys.readouterr().err
    from hpc_es.cli import COMMANDS

    assert {"train", "eval", "fingerprint", "replay", "submit"} <= set(COMMANDS)
    assert err == (f"hpc_es: error: unknown command 'bogus'; the commands are {', '.join(COMMANDS)} (train is the "
                   "default; settings are given as key=value)\n")
    assert main(["configs/x.yaml"]) == 2
    assert "for a config file use --config configs/x.yaml" in capsys.readouterr().err


def test_zero_iterations_print_null_not_nan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(TINY + ["es.iterations=0", f"run_dir={tmp_path / 'r'}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert "NaN" not in out
    summary = json.loads(out)
    assert summary["iterations"] == 0 and summary["reward_mean_first"] is None and summary["reward_mean_last"] is None


def test_replay_on_a_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "file"
    f.write_text("")
    assert main(["replay", str(f), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"hpc_es: error: run_dir '{f}' is a file, not a run folder\n"


def test_replay_out_onto_the_run_itself_is_refused_before_any_work(reference_run: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    before = sorted(p.name for p in reference_run.iterdir())
    assert main(["replay", str(reference_run), "--out", str(reference_run)]) == 2
    err = capsys.readouterr().err
    assert err == (f"hpc_es: error: output folder '{reference_run}' is not empty and is not a model saved by "
                   "hpc_es; refusing to replace it (give a new or empty folder)\n")
    assert sorted(p.name for p in reference_run.iterdir()) == before
    assert main(["replay", str(reference_run), "--out", str(reference_run / "log.h5")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_replay_out_twice_replaces_its_own_output(reference_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "replayed"
    assert main(["replay", str(reference_run), "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out)["fingerprint"]
    assert main(["replay", str(reference_run), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"] == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replayed"]
    assert isinstance(HpcEsError, type)


# ---- case 10: a full disk during a checkpoint or ledger write ----------------------------------

def full_disk_for_checkpoints(real: object, armed: list[bool]) -> object:
    """safetensors' writer failing as on a full disk (its wording) for checkpoint weights while armed."""
    calls = [0]

    def write(tensors: object, filename: str, *args: object, **kwargs: object) -> object:
        if "checkpoint.tmp-" in str(filename) and armed[0]:
            calls[0] += 1
            if calls[0] >= 2:
                raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)  # type: ignore[operator]
    return write


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_rerun_resumes_exactly(
        tmp_path: Path, reference_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import safetensors.torch

    from conftest import fingerprint_of

    run_dir = tmp_path / "r"
    armed = [True]
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_for_checkpoints(safetensors.torch.save_file, armed))
    assert main(TINY + ["checkpoint.every=1", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("hpc_es: error:")] == [
        (f"hpc_es: error: cannot write the checkpoint '{run_dir}/checkpoint.tmp-{os.getpid()}': No space left on "
         "device; nothing was lost; free space and rerun to resume")]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint", "log.h5"]
    armed[0] = False
    assert main(TINY + [f"run_dir={run_dir}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fingerprint"] == \
        fingerprint_of(reference_run / "final")


def test_a_full_disk_during_a_ledger_write_is_one_line_and_the_rerun_resumes_exactly(
        tmp_path: Path, reference_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from conftest import fingerprint_of
    from hpc_es import fsio, ledger

    run_dir = tmp_path / "r"
    real_create = fsio.create_new

    def create(path: str) -> int:  # the ledger's temporary file, created by fsio.write_atomic
        done = run_dir / "log.h5"
        if str(path).endswith("log.h5.tmp") and done.exists() and len(ledger.Ledger.load(str(done))) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_create(path)

    monkeypatch.setattr(fsio, "create_new", create)
    assert main(TINY + [f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Slist" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("hpc_es: error:")] == [
        (f"hpc_es: error: cannot write the ledger '{run_dir}/log.h5': No space left on device; nothing was "
         "lost; free space and rerun to resume")]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "log.h5"]
    monkeypatch.undo()
    assert main(TINY + [f"run_dir={run_dir}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fingerprint"] == \
        fingerprint_of(reference_run / "final")


# ---- whole runs: rewards that hang or exit, weights that overflow ------------------------------

@pytest.mark.parametrize("body, message", [
    ("while True: pass", "task 'user' reward did not return within 0.5 s on prompt 'Q: hi\\nA:' "
                         "(rollout.reward_timeout_s)"),
    ("sys.exit(0)", "task 'user' reward called sys.exit(0) on prompt 'Q: hi\\nA:'"),
])
def test_a_reward_that_hangs_or_exits_stops_the_run_with_one_line(body: str, message: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "stuck_task.py"
    f.write_text(user_task(body))
    t0 = time.monotonic()
    code = main(TINY + [f"task={f}:task", "rollout.reward_timeout_s=0.5", f"run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 60
    assert [ln for ln in err.splitlines() if ln.startswith("hpc_es: error:")] == [f"hpc_es: error: {message}"]
    assert not (tmp_path / "r" / "log.h5").exists()


def test_weights_that_overflow_stop_the_run_before_anything_is_saved(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "r"
    assert main(TINY + ["dtype=float16", "es.alpha=1000000", "checkpoint.every=1", f"run_dir={run_dir}"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hpc_es: error:")]
    assert len(err) == 1 and err[0].startswith("hpc_es: error: iteration 0 made the weights non-finite (first in '")
    assert "es.alpha=1e+06" in err[0] and "log.h5 holds the 0 iterations before it" in err[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # no ledger row, no checkpoint, no final/


@pytest.mark.parametrize("setting, message", [
    ("run_dir={file}", "run_dir '{file}' is a file, not a folder"),
    ("run_dir={file}/sub", "run_dir '{file}/sub': Not a directory"),
    ("tiny.cache_dir={file}", "tiny.cache_dir '{file}' is a file, not a folder"),
    ("data.path=/dev/zero", "data file '/dev/zero' is not a regular file"),
])
def test_unusable_paths_are_one_line_before_the_model_loads(setting: str, message: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "a_file"
    f.write_text("")
    args = [setting.format(file=f)] + ([] if setting.startswith("run_dir") else [f"run_dir={tmp_path / 'r'}"])
    assert main(TINY + args) == 2
    err = capsys.readouterr().err
    assert err == f"hpc_es: error: {message.format(file=f)}\n"  # no "loading ..." line: nothing was loaded
