"""Real multi-process launches (mpiexec, torchrun) of the TINY config.

Every launch must reproduce the single-process run bit for bit; only rewards and a few control scalars may
cross ranks; a diverged, failing or surplus rank must stop the whole job quickly with a message naming it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import PY, ROOT, TINY, fingerprint_of, ledger_arrays, mpiexec, run_hpc_es

pytestmark = pytest.mark.integration

TORCHRUN = str(Path(PY).parent / "torchrun")
LAUNCHERS = ["mpi", "torch"]
PROMPT_S = 60  # a failing job must be over well within this (collective timeouts are minutes)


def launch(kind: str, ranks: int, args: list[str], env: dict[str, str] | None = None,
           timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m hpc_es ARGS`` on ``ranks`` ranks: kind 'mpi' (mpiexec), 'torch' (torchrun) or 'none'."""
    if kind == "mpi":
        cmd = mpiexec(ranks) + [PY, "-m", "hpc_es"]
    elif kind == "torch":
        cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks), "-m", "hpc_es"]
    else:
        assert ranks == 1
        cmd = [PY, "-m", "hpc_es"]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT))
    full_env.update(env or {})
    t0 = time.monotonic()
    proc = subprocess.run(cmd + list(args), cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - t0


def ok(proc: subprocess.CompletedProcess) -> dict:
    """The summary JSON of a successful run; rank 0 alone prints to stdout."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"only rank 0 may print to stdout:\n{proc.stdout}"
    assert proc.stderr.count("checkpoint saved") == 1, proc.stderr
    return json.loads(lines[0])


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    # Open MPI's output forwarding can prefix a line with a NUL byte when ranks write at once.
    return [ln.lstrip("\x00") for ln in proc.stderr.splitlines() if ln.lstrip("\x00").startswith("hpc_es: error:")]


@functools.lru_cache(maxsize=None)
def _reference_fingerprint(model_dir: str) -> str:
    return fingerprint_of(model_dir)


def assert_same_run(run_dir: Path, summary: dict, ref_dir: Path) -> None:
    ref_fp = _reference_fingerprint(str(ref_dir / "final"))
    assert summary["fingerprint"] == ref_fp
    assert fingerprint_of(run_dir / "final") == ref_fp
    got, ref = ledger_arrays(run_dir), ledger_arrays(ref_dir)
    for key in ("seeds", "signs", "rewards", "shaped"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def assert_small_traffic(run_dir: Path, n: int, world: int, slots: int) -> None:
    led = ledger_arrays(run_dir)
    assert (led["world_size"] == world).all()
    assert (led["slots"] == slots).all()
    assert (led["bytes_sent"] > 0).all()
    assert (led["bytes_sent"] <= 8 * n + 64).all(), led["bytes_sent"]
    assert json.loads(led["attrs"]["events"]) == []


@pytest.fixture(scope="session")
def reference_n3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single process, es.population_size=3 (not divisible by 2 ranks)."""
    run_dir = tmp_path_factory.mktemp("reference_n3") / "run"
    run_hpc_es(TINY + ["es.population_size=3", f"run_dir={run_dir}"], check=True)
    return run_dir


@pytest.fixture(scope="session")
def reference_n2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference_n2") / "run"
    run_hpc_es(TINY + ["es.population_size=2", f"run_dir={run_dir}"], check=True)
    return run_dir


# ---- every launch gives the same bits ----------------------------------------------------------

@pytest.mark.parametrize("kind", LAUNCHERS)
def test_two_ranks_reproduce_the_single_process_run(kind: str, reference_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # check_every=1: the fingerprint check runs (and is paid for) every iteration
    proc, _ = launch(kind, 2, TINY + [f"run_dir={run_dir}", "dist.check_every=1"])
    assert_same_run(run_dir, ok(proc), reference_run)
    assert_small_traffic(run_dir, n=4, world=2, slots=2)
    # rank 0 alone says what it runs
    banner = [ln for ln in proc.stderr.splitlines() if "parameters, " in ln]
    assert len(banner) == 1 and f"2 rank(s) x 1 replica(s) ({kind}); task conciseness, N=4, sigma=0.05, " \
        f"alpha=0.02; iterations 1..3; ledger {run_dir}/log.h5" in banner[0], proc.stderr


@pytest.mark.parametrize("kind", LAUNCHERS)
def test_population_not_divisible_by_ranks(kind: str, reference_n3: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, _ = launch(kind, 2, TINY + ["es.population_size=3", f"run_dir={run_dir}", "dist.check_every=1"])
    assert_same_run(run_dir, ok(proc), reference_n3)
    assert_small_traffic(run_dir, n=3, world=2, slots=2)


@pytest.mark.parametrize("kind,ranks,setting", [("none", 1, "dist.devices_per_rank=2"),
                                                ("mpi", 2, "dist.devices_per_rank=2"),
                                                ("torch", 2, "dist.devices_per_rank=2"),
                                                ("none", 1, "dist.replicas_per_device=2")])
def test_two_replicas_per_rank_evaluated_concurrently(kind: str, ranks: int, setting: str, reference_run: Path,
                                                      tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, _ = launch(kind, ranks, TINY + [f"run_dir={run_dir}", setting, "dist.check_every=1"])
    assert_same_run(run_dir, ok(proc), reference_run)
    assert_small_traffic(run_dir, n=4, world=ranks, slots=2 * ranks)


# ---- more ranks than members ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAUNCHERS)
def test_more_ranks_than_members_is_a_quick_clear_error(kind: str, tmp_path: Path) -> None:
    proc, wall = launch(kind, 3, TINY + ["es.population_size=2", f"run_dir={tmp_path / 'run'}"])
    assert proc.returncode != 0
    assert wall < PROMPT_S
    lines = error_lines(proc)
    assert len(lines) == 1 and "3 ranks but only 2 population members" in lines[0], proc.stderr
    assert "dist.allow_idle_ranks=true" in lines[0]
    if kind == "mpi":  # (torchrun itself prints a traceback for any failed worker)
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "log.h5").exists()


@pytest.mark.parametrize("kind", LAUNCHERS)
@pytest.mark.parametrize("case", ["config", "resume"])
def test_an_error_every_rank_hits_is_reported_once_without_an_abort(kind: str, case: str, reference_run: Path,
                                                                     tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    bad = ["es.sigma=-1"] if case == "config" else ["es.sigma=0.07", "es.iterations=5"]
    proc, wall = launch(kind, 2, TINY + [f"run_dir={run_dir}"] + bad)
    assert proc.returncode != 0 and wall < PROMPT_S
    if kind == "mpi":  # mpiexec passes on the first non-zero status (torchrun exits 1 for any)
        assert proc.returncode == 2
    expected = ("config key 'es.sigma' = -1.0 is out of range" if case == "config" else
                f"the checkpoint in '{run_dir}' belongs to a run with different es.sigma")
    assert [ln.startswith(f"hpc_es: error: {expected}") for ln in error_lines(proc)] == [True], proc.stderr
    assert "MPI_ABORT" not in proc.stderr and "rank 1" not in proc.stderr
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # refused before anything was written


def test_allow_idle_ranks_idles_the_surplus_and_still_reproduces(reference_n2: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, _ = launch("mpi", 3, TINY + ["es.population_size=2", f"run_dir={run_dir}", "dist.allow_idle_ranks=true",
                                       "dist.check_every=1"])
    summary = ok(proc)
    assert "ranks 2..2 idle" in proc.stderr
    assert_same_run(run_dir, summary, reference_n2)
    assert_small_traffic(run_dir, n=2, world=3, slots=3)


# ---- divergence -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAUNCHERS)
def test_divergence_stops_the_job_at_the_next_check(kind: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, wall = launch(kind, 2, TINY + [f"run_dir={run_dir}", "dist.check_every=2"],
                        env={"HPC_ES_FAULT": "nudge:0:1"})
    assert proc.returncode != 0
    if kind == "mpi":
        assert proc.returncode == 3
    assert wall < PROMPT_S
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "diverged after iteration 1" in lines[0] and "rank(s) 1 differ from rank 0" in lines[0]
    led = ledger_arrays(run_dir)
    assert len(led["iteration"]) == 2  # iterations 0 and 1 ran; the check after 1 stopped the job
    events = json.loads(led["attrs"]["events"])
    assert [(e["iteration"], e["event"]) for e in events] == [(1, "divergence")]
    assert "rank(s) 1" in events[0]["detail"]
    assert not (run_dir / "final").exists()


# ---- a failing rank -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAUNCHERS)
def test_a_raising_rank_stops_every_rank_promptly(kind: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, wall = launch(kind, 2, TINY + [f"run_dir={run_dir}"], env={"HPC_ES_FAULT": "raise:1:1"})
    assert proc.returncode != 0
    if kind == "mpi":
        assert proc.returncode == 3
    assert wall < PROMPT_S, f"took {wall:.0f} s"
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "iteration 1 failed" in lines[0]
    assert "rank 1: RuntimeError: injected failure at iteration 1" in lines[0]
    assert len(ledger_arrays(run_dir)["iteration"]) == 1


FLAKY_TASK = textwrap.dedent("""
    import dataclasses, os

    def make(cfg):
        rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0"))
        if rank == "1":
            raise RuntimeError("no data on this node")
        from hpc_es.tasks import load_task
        return load_task(dataclasses.replace(cfg, task="conciseness"))
""")


@pytest.mark.parametrize("kind", LAUNCHERS)
def test_a_rank_failing_during_setup_does_not_hang_the_others(kind: str, tmp_path: Path) -> None:
    task = tmp_path / "flaky_task.py"
    task.write_text(FLAKY_TASK)
    proc, wall = launch(kind, 2, TINY + [f"run_dir={tmp_path / 'run'}", f"task={task}:make"])
    assert proc.returncode != 0
    assert wall < PROMPT_S, f"took {wall:.0f} s"
    assert any("rank 1 failed" in ln and "no data on this node" in ln for ln in error_lines(proc)), proc.stderr


def test_a_killed_rank_ends_the_job(tmp_path: Path) -> None:
    # rank 1 is SIGKILLed in its rollout of iteration 1: no Python error handling runs there at all
    proc, wall = launch("mpi", 2, TINY + [f"run_dir={tmp_path / 'run'}"], env={"HPC_ES_FAULT": "rollout:1:1"})
    assert proc.returncode != 0
    assert wall < PROMPT_S, f"took {wall:.0f} s"
    assert not (tmp_path / "run" / "final").exists()


# ---- eval ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAUNCHERS)
def test_eval_split_over_two_ranks_gives_the_single_process_result(kind: str, reference_run: Path) -> None:
    # 7 test items in batches of 2: rank 0 takes batches 0 and 2, rank 1 batches 1 and 3 (a short one)
    args = ["eval", "task=countdown", "data.synthetic_size=40", "data.train_size=33", "rollout.batch_size=2",
            "rollout.max_new_tokens=6", f"model={reference_run / 'final'}"]
    one = run_hpc_es(args, check=True)
    proc, _ = launch(kind, 2, args)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # rank 0 alone reports
    got, ref = json.loads(lines[0]), json.loads(one.stdout.strip().splitlines()[-1])
    assert got.pop("world_size") == 2 and "world_size" not in ref
    assert got == ref and ref["examples"] == 7
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpc_es: eval ")]
    assert progress[-1].startswith("hpc_es: eval 4/4 prompts (rank 0's share of 7)"), proc.stderr


EVAL_EVERY = ["data.test_size=5", "rollout.batch_size=2", "eval.every=2"]


@pytest.fixture(scope="module")
def reference_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference_eval") / "run"
    run_hpc_es(TINY + EVAL_EVERY + [f"run_dir={run_dir}"], check=True)
    return run_dir


@pytest.mark.parametrize("kind", LAUNCHERS)
def test_periodic_test_evaluation_is_the_same_on_two_ranks(kind: str, reference_eval: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, _ = launch(kind, 2, TINY + EVAL_EVERY + [f"run_dir={run_dir}"])
    assert_same_run(run_dir, ok(proc), reference_eval)
    got, ref = ledger_arrays(run_dir), ledger_arrays(reference_eval)
    np.testing.assert_array_equal(got["eval_reward"], ref["eval_reward"])
    assert np.isfinite(got["eval_reward"]).sum() == 2
    assert proc.stderr.count("test split after iteration") == 2  # rank 0 alone reports

