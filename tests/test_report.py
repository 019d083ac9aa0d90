"""`python -m hpc_es report` and `log.tensorboard`: figures that show the ledger's curves, a summary with the
ledger's numbers, TensorBoard steps exactly once each (also across kill -9 and resume), and one clear line
for a missing ledger, a damaged one, or a missing optional extra.

Tests that start processes are marked ``integration``; the rest work on ledgers built in-process.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, TINY, fingerprint_of, ledger_arrays, run_hpc_es

from hpc_es import cli
from hpc_es import report as rp
from hpc_es.ledger import Ledger
from hpc_es.tboard import TensorBoardLog

ITERS = 4
RUN = TINY + [f"es.iterations={ITERS}", "eval.every=2", "eval.limit=4", "log.tensorboard=true"]
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours
integration = pytest.mark.integration


# ---- helpers ------------------------------------------------------------------------------------------

def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of ``folder``, as tensorboard's own reader sees them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_events_match_ledger(run_dir: Path) -> None:
    """One value per iteration per scalar (eval tags only where evaluated), each equal to the ledger's."""
    got, led = scalars(run_dir / "tensorboard"), ledger_arrays(run_dir)
    n = len(led["iteration"])
    expect = {"reward/mean": "reward_mean", "reward/max": "reward_max", "reward/min": "reward_min",
              "seconds/perturb": "time_perturb", "seconds/rollout": "time_rollout", "seconds/reward": "time_reward",
              "seconds/update": "time_update", "seconds/eval": "time_eval", "seconds/iteration": "time_iteration",
              "comm/bytes_sent": "bytes_sent", "eval/reward": "eval_reward"}
    assert set(expect) <= set(got), sorted(got)
    assert "eval/accuracy" not in got  # conciseness has no accuracy: NaN everywhere, so no curve
    for tag, col in expect.items():
        values = np.asarray(led[col], dtype=np.float64)
        steps = [t + 1 for t in range(n) if math.isfinite(values[t])]
        assert [s for s, _ in got[tag]] == steps, tag
        np.testing.assert_array_equal([v for _, v in got[tag]],
                                      values[np.isfinite(values)].astype(np.float32), err_msg=tag)
    assert [s for s, _ in got["eval/reward"]] == [2, 4]


def pixels(png: Path, colour: tuple[int, int, int], box: tuple[int, int, int, int] | None = None) -> int:
    """How many pixels of ``png`` (inside ``box`` = rows y0:y1, columns x0:x1) have ``colour``."""
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    if box is not None:
        y0, y1, x0, x1 = box
        img = img[y0:y1, x0:x1]
    rgb = (img[..., :3] * 255).round().astype(int)
    return int((np.abs(rgb - np.array(colour)).max(axis=-1) <= 3).sum())


def plot_area(fig: Any) -> tuple[int, int, int, int]:
    """The first axes' inner area in PNG pixel rows/columns (display y grows upwards, image rows down)."""
    fig.canvas.draw()
    bb = fig.axes[0].get_window_extent()
    height = round(fig.bbox.height)
    return (height - int(bb.y1) + 2, height - int(bb.y0) - 2, int(bb.x0) + 2, int(bb.x1) - 2)


def drawn_texts_overlap(fig: Any) -> list[tuple[str, str]]:
    """Pairs of texts that the renderer actually drew and whose boxes intersect."""
    fig.canvas.draw()  # settle the constrained layout
    renderer = fig.canvas.get_renderer()
    drawn: list[Any] = []
    original = renderer.draw_text

    def spy(gc: Any, x: float, y: float, s: str, prop: Any, angle: float, ismath: Any = False,
            mtext: Any = None) -> None:
        if mtext is not None and s.strip():
            drawn.append(mtext)
        original(gc, x, y, s, prop, angle, ismath=ismath, mtext=mtext)

    renderer.draw_text = spy
    try:
        fig.canvas.draw()
    finally:
        del renderer.draw_text
    boxes = [(t.get_text(), t.get_window_extent(renderer).padded(-0.5)) for t in dict.fromkeys(drawn)]
    assert len(boxes) >= 6  # titles, axis labels, ticks, legend: the spy saw the figure's text
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


def synthetic_run(n: int = 80, name: str = "a-rather-long-run-name-that-must-be-shortened-in-titles") -> rp.Run:
    """A Run with the optional columns other issues add (accuracy by two rules, KL, tokens)."""
    rng = np.random.default_rng(0)
    rows = []
    for t in range(n):
        mean = -20 + 17 * t / n + rng.normal()
        evaluated = (t + 1) % 10 == 0
        rows.append({"iteration": t, "sigma": 0.05, "alpha": 0.1, "reward_mean": mean, "reward_max": mean + 3,
                     "reward_min": mean - 5, "time_perturb": 0.04, "time_rollout": 0.5, "time_reward": 0.002,
                     "time_restore": 0.0, "time_update": 0.01, "time_eval": 0.3 if evaluated else 0.0,
                     "time_iteration": 0.6 + (0.3 if evaluated else 0.0), "bytes_sent": 64, "world_size": 2,
                     "slots": 2, "rollout_tokens": 8192,
                     "eval_reward": mean + 1 if evaluated else math.nan,
                     "eval_accuracy": t / n if evaluated else math.nan,
                     "eval_accuracy_paper": t / n / 2 if evaluated else math.nan,
                     "eval_kl": 0.01 * t if evaluated else math.nan})
    cfg = {"model": "tiny", "task": "countdown", "es": {"iterations": 100, "sigma": 0.05, "alpha": 0.1}}
    return rp.Run(name, "/nonexistent", "/nonexistent/log.h5", 16, cfg, rows)


def saved_ledger(run_dir: Path, rows: int) -> Ledger:
    """A real ledger file with ``rows`` iterations, written as the trainer writes it."""
    led = Ledger(4, {"config": '{"model": "tiny", "task": "conciseness", "es": {"iterations": 9}}'})
    for t in range(rows):
        led.append({"iteration": t, "seeds": np.arange(4) + t, "signs": np.ones(4, np.int8),
                    "rewards": np.array([-3.0, -2.0, -1.0, -2.0]) + t, "shaped": np.zeros(4), "sigma": 0.05,
                    "alpha": 0.02, "reward_mean": -2.0 + t, "reward_max": -1.0 + t, "reward_min": -3.0 + t,
                    "time_perturb": 0.1, "time_rollout": 0.2, "time_reward": 0.01, "time_restore": 0.0,
                    "time_update": 0.05, "time_iteration": 0.4, "bytes_sent": 48, "world_size": 1, "slots": 1,
                    "eval_reward": math.nan, "eval_accuracy": math.nan, "time_eval": 0.0})
    run_dir.mkdir(parents=True, exist_ok=True)
    led.save(str(run_dir / "log.h5"))
    return led


def report_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    rc = cli.main(["report", *args])
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


def block_import(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``import package`` (and its submodules) fail as if it were not installed."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


# ---- real runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-iteration tiny run with a test-split evaluation every 2 iterations and TensorBoard on."""
    run_dir = tmp_path_factory.mktemp("report") / "evaluated"
    run_hpc_es(RUN + [f"run_dir={run_dir}"], check=True, env={"HPC_ES_FAULT": ""})
    return run_dir


@integration
def test_report_writes_legible_figures_and_the_ledgers_numbers(evaluated: Path) -> None:
    proc = run_hpc_es(["report", str(evaluated)], check=True)
    assert proc.stderr == ""
    led = ledger_arrays(evaluated)
    mean = led["reward_mean"]
    best = int(np.argmax(mean))
    out = proc.stdout

    def line(label: str) -> str:
        found = [ln for ln in out.splitlines() if ln.strip().startswith(label)]
        assert len(found) == 1, (label, out)
        return found[0]

    assert line("model").split() == ["model", "tiny"]
    assert line("task").split() == ["task", "conciseness"]
    assert line("N, sigma, alpha").split()[-3:] == ["4,", f"{led['sigma'][-1]:.6g},", f"{led['alpha'][-1]:.6g}"]
    assert line("ranks, replicas").split()[-2:] == ["1,", "1"]
    assert line("iterations").split() == ["iterations", str(ITERS), "of", str(ITERS)]
    assert line("mean reward").split()[2:] == [
        "first", f"{mean[0]:.6g},", "last", f"{mean[-1]:.6g},", "best", f"{mean[best]:.6g}", "(iteration",
        f"{best + 1})"]
    assert line("test reward").split()[2:] == [f"{led['eval_reward'][-1]:.6g}", "(after", "iteration", "4)"]
    assert "n/a (this task reports no accuracy)" in line("test accuracy")
    assert line("s/iteration").split()[1] == f"{np.mean(led['time_iteration']):.6g}"
    assert line("tokens/s").split()[1] == "n/a"
    folder = evaluated / "report"
    assert line("figures:").split()[1:] == [str(folder / "reward.png"), str(folder / "time.png")]

    import matplotlib.image

    run, _ = rp.load_run(str(evaluated))
    # conciseness measures KL to the base model by default (eval.kl=auto): the reward figure gets a KL panel
    kl = bool(np.isfinite(led["eval_kl_per_token"]).any())
    assert kl
    for name, build in (("reward.png", rp.reward_figure), ("time.png", rp.time_figure)):
        png = folder / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(str(png)).shape == (610 if name == "reward.png" else 450, 800, 4)
        box = plot_area(build(run))
        assert box[1] - box[0] > 200 and box[3] - box[2] > 500
        if name == "reward.png":
            assert pixels(png, C0, box) > 300  # the mean-reward line crosses the plot
            assert pixels(png, C1, box) > 100  # the test-split reward line
        else:
            assert pixels(png, C1, box) > 2000  # the rollout bars
        assert not drawn_texts_overlap(build(run))


@integration
def test_tensorboard_holds_each_iteration_once(evaluated: Path) -> None:
    assert len(list((evaluated / "tensorboard").iterdir())) == 1
    assert_events_match_ledger(evaluated)


@integration
@pytest.mark.parametrize("fault", ["tensorboard:2", "after_ledger:2"])
def test_tensorboard_resumes_without_duplicate_steps(evaluated: Path, tmp_path: Path, fault: str) -> None:
    """Killed (-9) after iteration 2's ledger row, before (tensorboard:2) or after its event was written;
    the event file also gets a torn last record.  The resumed run's curves have each step exactly once."""
    run_dir = tmp_path / "killed"
    proc = run_hpc_es(RUN + ["checkpoint.every=1", f"run_dir={run_dir}"], env={"HPC_ES_FAULT": fault})
    assert proc.returncode == -9, proc.stderr
    assert ledger_arrays(run_dir)["iteration"].tolist() == [0, 1, 2]
    before = scalars(run_dir / "tensorboard")
    assert [s for s, _ in before["reward/mean"]] == ([1, 2] if fault.startswith("tensorboard") else [1, 2, 3])
    (event_file,) = (run_dir / "tensorboard").iterdir()
    with open(event_file, "ab") as fh:
        fh.write(b"\x30\x00\x00\x00\x00\x00\x00\x00torn")
    (run_dir / "tensorboard.tmp-1").mkdir()  # left by a kill during an earlier rebuild
    run_hpc_es(RUN + ["checkpoint.every=1", f"run_dir={run_dir}"], env={"HPC_ES_FAULT": ""}, check=True)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("tensorboard")) == ["tensorboard"]
    assert_events_match_ledger(run_dir)
    assert fingerprint_of(run_dir / "final") == fingerprint_of(evaluated / "final")
    np.testing.assert_array_equal(ledger_arrays(run_dir)["reward_mean"], ledger_arrays(evaluated)["reward_mean"])


@integration
def test_report_overlays_several_runs(evaluated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "seed1"
    run_hpc_es(TINY + [f"es.iterations={ITERS}", "seed=1", f"run_dir={other}"], check=True)
    out = tmp_path / "figs"
    rc, text, err = report_in_process(capsys, str(evaluated), str(other), "--out", str(out))
    assert rc == 0 and err == []
    assert text.count("\nrun ") + text.startswith("run ") == 2
    for name in ("evaluated", "seed1"):
        assert (out / name / "reward.png").is_file() and (out / name / "time.png").is_file()
    runs = [rp.load_run(str(evaluated))[0], rp.load_run(str(other))[0]]
    fig = rp.overlay_figure(runs)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["evaluated", "seed1"]
    box = plot_area(fig)
    assert pixels(out / "reward_overlay.png", C0, box) > 300
    assert pixels(out / "reward_overlay.png", C1, box) > 300
    assert not drawn_texts_overlap(fig)


@integration
def test_report_reads_the_checkpoint_copy_of_a_damaged_ledger(evaluated: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "damaged"
    shutil.copytree(evaluated, run_dir, ignore=shutil.ignore_patterns("final", "report", "tensorboard"))
    log = run_dir / "log.h5"
    log.write_bytes(log.read_bytes()[: log.stat().st_size // 2])
    rc, out, err = report_in_process(capsys, str(run_dir))
    assert rc == 0
    assert len(err) == 1 and err[0].startswith("hpc_es: warning: damaged: ledger "), err
    assert "unreadable or incomplete" in err[0] and "checkpoint's copy of the ledger instead (4 iterations)" in err[0]
    assert f"({run_dir / 'checkpoint' / 'log.h5'})" in out
    assert re.search(r"iterations\s+4 of 4", out)
    assert (run_dir / "report" / "reward.png").is_file()


@integration
def test_report_reads_a_run_that_is_going(tmp_path: Path) -> None:
    """Reads while the trainer replaces log.h5 every iteration: each one finds a complete ledger."""
    import subprocess
    import time

    run_dir = tmp_path / "going"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HPC_ES_FAULT="")
    proc = subprocess.Popen([sys.executable, "-m", "hpc_es", *TINY, "es.iterations=8", f"run_dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = []
    try:
        while proc.poll() is None:
            time.sleep(0.02)
            if not (run_dir / "log.h5").exists():
                continue
            run, notes = rp.load_run(str(run_dir))
            assert notes == []
            s = rp.summarise(run)
            assert s["iterations"] == len(run.rows) and s["reward_last"] == run.rows[-1]["reward_mean"]
            seen.append(s["iterations"])
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == 0
    assert seen and seen == sorted(seen) and all(1 <= n <= 8 for n in seen), seen


@integration
def test_missing_tensorboard_stops_training_with_one_line(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('simulated: tensorboard is not installed')\n")
    proc = run_hpc_es(RUN + [f"run_dir={tmp_path / 'run'}"],
                      env={"PYTHONPATH": f"{ROOT}{os.pathsep}{shadow.parent}", "HPC_ES_FAULT": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        ("hpc_es: error: log.tensorboard=true needs tensorboard, which is not installed; install the 'report' "
         "extra: pip install -e \".[report]\"")]
    assert not (tmp_path / "run" / "log.h5").exists()


# ---- in-process --------------------------------------------------------------------------------------

def test_report_needs_a_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = report_in_process(capsys, str(tmp_path))
    assert (rc, out) == (2, "")
    assert err == [(f"hpc_es: error: '{tmp_path}' holds no ledger (log.h5): not a run directory, or its first "
                    "iteration has not finished yet")]
    rc, out, err = report_in_process(capsys, str(tmp_path / "nope"))
    assert (rc, out, err) == (2, "", [f"hpc_es: error: run directory '{tmp_path / 'nope'}' does not exist"])


def test_report_on_a_truncated_ledger_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved_ledger(tmp_path, 5)
    log = tmp_path / "log.h5"
    log.write_bytes(log.read_bytes()[:1000])
    rc, out, err = report_in_process(capsys, str(tmp_path))
    assert (rc, out) == (2, "")
    assert len(err) == 1, err
    assert err[0].startswith(f"hpc_es: error: ledger '{log}' is unreadable or incomplete (")
    assert err[0].endswith("; there is no checkpoint copy (checkpoint/log.h5) to fall back on")


def test_report_on_a_run_with_no_iterations_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved_ledger(tmp_path, 0)
    rc, out, err = report_in_process(capsys, str(tmp_path))
    assert (rc, err) == (0, [])
    assert re.search(r"iterations\s+0 of 9\n", out) and "no iterations recorded yet: no figures" in out
    assert not (tmp_path / "report").exists()


def test_report_without_matplotlib_names_the_extra(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    saved_ledger(tmp_path, 2)
    block_import(monkeypatch, "matplotlib")
    rc, out, err = report_in_process(capsys, str(tmp_path))
    assert (rc, out) == (2, "")
    assert err == [("hpc_es: error: python -m hpc_es report needs matplotlib, which is not installed; install "
                    "the 'report' extra: pip install -e \".[report]\"")]


def test_tensorboard_log_without_tensorboard_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_es.errors import ExtraMissing

    block_import(monkeypatch, "tensorboard")
    with pytest.raises(ExtraMissing, match=r"pip install -e \"\.\[report\]\""):
        TensorBoardLog(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_optional_columns_are_summarised_and_drawn(tmp_path: Path) -> None:
    run = synthetic_run()
    s = rp.summarise(run)
    assert s["eval"] == {"reward": (run.rows[79]["eval_reward"], 80), "accuracy": (79 / 80, 80),
                         "accuracy_paper": (79 / 160, 80), "kl": (0.79, 80)}
    assert s["tokens_per_s"] == pytest.approx(8192 * 80 / sum(r["time_iteration"] for r in run.rows), rel=1e-12)
    assert s["ranks"] == [2] and s["best_iteration"] == int(np.argmax(run.column("reward_mean"))) + 1
    text = rp.format_summary(s)
    assert f"test accuracy   {79 / 80:.6g} (after iteration 80)" in text
    assert f"test kl         {0.79:.6g} (after iteration 80)" in text
    assert f"tokens/s        {s['tokens_per_s']:.6g}" in text
    fig = rp.reward_figure(run)
    assert [ax.get_ylabel() for ax in fig.axes] == ["reward (task score, mean over prompts)", "KL to base (nats)",
                                                    "test accuracy (fraction correct)"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "min-max over the population", "mean reward (training)", "test-split mean reward",
        "test-split accuracy", "test-split accuracy paper", "test-split KL"]
    assert not drawn_texts_overlap(fig)
    assert not drawn_texts_overlap(rp.time_figure(run))
    png = rp.save(fig, str(tmp_path / "r.png"))
    import matplotlib.image

    assert matplotlib.image.imread(png).shape == (610, 800, 4)
    assert os.listdir(tmp_path) == ["r.png"]


def test_old_ledger_rows_without_test_columns() -> None:
    """A ledger from before eval.every: no eval_* and no time_eval column; nothing breaks, nothing is made up."""
    run = synthetic_run(6)
    for row in run.rows:
        for key in [k for k in row if k.startswith("eval_") or k in ("time_eval", "rollout_tokens")]:
            del row[key]
    s = rp.summarise(run)
    assert s["eval"] == {} and s["tokens_per_s"] is None and "test-split eval" not in s["phases"]
    assert "n/a (no test-split evaluation in the ledger; see eval.every)" in rp.format_summary(s)
    fig = rp.reward_figure(run)
    assert len(fig.axes) == 1 and len(fig.legends[0].get_texts()) == 2
    assert not drawn_texts_overlap(fig)


def test_tensorboard_start_rebuilds_from_the_ledger(tmp_path: Path) -> None:
    """Whatever the folder held (steps past the ledger, a torn record), start leaves one event per ledger row."""
    rows = saved_ledger(tmp_path / "ledger", 5).rows
    old = TensorBoardLog(str(tmp_path))
    old.start(rows)  # steps 1..5
    old.close()
    (stale,) = (tmp_path / "tensorboard").iterdir()
    with open(stale, "ab") as fh:
        fh.write(b"\x01\x02torn")
    log = TensorBoardLog(str(tmp_path))
    log.start(rows[:3])  # resumed from a checkpoint at 3 iterations
    log.write(rows[3])
    log.close()
    got = scalars(tmp_path / "tensorboard")
    assert set(got) == {"reward/mean", "reward/max", "reward/min", "seconds/perturb", "seconds/rollout",
                        "seconds/reward", "seconds/restore", "seconds/update", "seconds/iteration",
                        "seconds/eval", "comm/bytes_sent"}
    for tag, values in got.items():
        assert [s for s, _ in values] == [1, 2, 3, 4], tag
    assert [v for _, v in got["reward/mean"]] == [-2.0, -1.0, 0.0, 1.0]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_log_tensorboard_config_key() -> None:
    from hpc_es.config import load_config
    from hpc_es.errors import ConfigError

    assert load_config(None, []).log.tensorboard is False
    assert load_config(None, ["log.tensorboard=true"]).log.tensorboard is True
    with pytest.raises(ConfigError, match="'log.tensorboard' must be true or false"):
        load_config(None, ["log.tensorboard=yes please"])


def _pareto_run(sigma: float, seed: int, reward: float, kl: float) -> rp.Run:
    rows = [{**r, "eval_reward": math.nan, "eval_kl_k3_per_completion": math.nan,
             "eval_kl_per_completion": math.nan} for r in synthetic_run(3).rows]
    rows[1].update(eval_reward=reward - 5, eval_kl_k3_per_completion=kl / 2, eval_kl_per_completion=kl / 3)
    rows[2].update(eval_reward=reward, eval_kl_k3_per_completion=kl, eval_kl_per_completion=kl / 2)
    cfg = {"model": "m", "task": "conciseness", "seed": seed, "run_dir": f"/r/{sigma}-{seed}",
           "es": {"sigma": sigma, "alpha": sigma / 2}}
    return rp.Run(f"{sigma}-{seed}", "/nonexistent", "/nonexistent/log.h5", 16, cfg, rows)


def test_pareto_groups_seeds_by_setting_and_prints_table_2s_columns(tmp_path: Path) -> None:
    runs = [_pareto_run(1e-3, 0, -60.0, 0.2), _pareto_run(1e-3, 1, -40.0, 0.4),
            _pareto_run(2e-3, 0, -30.0, 1.0), _pareto_run(2e-3, 1, -20.0, 1.4), _pareto_run(2e-3, 2, -10.0, 1.8)]
    groups = rp.settings(runs)
    assert [(g.label, len(g.runs)) for g in groups] == [("alpha=0.0005, sigma=0.001", 2),
                                                         ("alpha=0.001, sigma=0.002", 3)]
    table = rp.pareto_table(groups).splitlines()
    # the final evaluation of each run; mean ± sample std over its seeds
    assert f"{-50:.4g} ± {np.std([-60, -40], ddof=1):.2g}" in table[1] and f"{0.3:.4g} ± {0.1414:.2g}" in table[1]
    assert f"{-20:.4g} ± {10:.2g}" in table[2] and f"{1.4:.4g} ± {0.4:.2g}" in table[2]
    assert f"{0.7:.4g} ± {0.2:.2g}" in table[2] and table[2].endswith("(3 seeds)")
    fig = rp.pareto_figure(groups)
    assert fig.axes[0].get_xlabel() == "KL to the base model, k3, per completion (nats)"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["alpha=0.0005, sigma=0.001 (2 runs)",
                                                                  "alpha=0.001, sigma=0.002 (3 runs)"]
    assert not drawn_texts_overlap(fig)
    box = plot_area(fig)
    png = Path(rp.save(fig, str(tmp_path / "pareto.png")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape == (450, 800, 4)
    assert pixels(png, C0, box) > 40 and pixels(png, C1, box) > 40  # both settings' markers and error bars
