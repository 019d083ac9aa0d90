"""The Slurm launchers on a real cluster (the ``slurm_cluster`` fixture): slurm/es_tiny.sh, hpc_es.submit,
a requeue in the middle of a run, and bad input.  About 3 minutes on 2 cores.

Every training here runs the same 2-rank config, so one ``mpiexec -n 2`` run is the reference for all.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fingerprint_of, ledger_arrays, mpiexec, run_hpc_es

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
ES_TINY = ROOT / "slurm" / "es_tiny.sh"
CONFIG = str(ROOT / "configs" / "tiny_mpi.yaml")
# Small, but with room to signal a job after 2 iterations and still stop it before the end.
RUN = ["es.iterations=10", "checkpoint.every=1", "progress=false"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """Final fingerprint of the config run uninterrupted under ``mpiexec -n 2``."""
    run_dir = tmp_path_factory.mktemp("mpiexec") / "run"
    run_hpc_es(["--config", CONFIG, *RUN, f"run_dir={run_dir}"], launcher=mpiexec(2), check=True)
    assert set(ledger_arrays(run_dir)["world_size"]) == {2}
    return fingerprint_of(run_dir / "final")


def _job_env(cluster, run_dir: Path, **extra: str) -> dict[str, str]:
    return {"HPC_ES_PYTHON": sys.executable, "HPC_ES_RUN_DIR": str(run_dir),
            "PATH": f"{Path(sys.executable).parent}:{cluster.env.get('PATH', os.defpath)}", **extra}


def _sbatch_tiny(cluster, tmp_path: Path, run_dir: Path, *overrides: str, **env: str) -> tuple[str, Path]:
    out = tmp_path / "job.out"
    job = cluster.submit(ES_TINY, *overrides, env=_job_env(cluster, run_dir, **env),
                         sbatch_args=[f"--output={out}", "--time=5"], cwd=tmp_path)
    return job, out


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else "(no output file)"


def _wait_for_iterations(run_dir: Path, n: int, job: str, cluster, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(ledger_arrays(run_dir)["world_size"]) >= n:
                return
        except (OSError, KeyError):
            pass  # not written yet
        state = cluster.state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before iteration {n}"
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} has not got {n} iterations after {timeout}s")


def _check_finished_run(run_dir: Path, reference: str) -> np.ndarray:
    ledger = ledger_arrays(run_dir)
    assert len(ledger["world_size"]) == 10 and set(ledger["world_size"]) == {2}
    assert fingerprint_of(run_dir / "final") == reference
    return ledger


def test_es_tiny_job_matches_mpiexec(slurm_cluster, tmp_path, reference):
    run_dir = tmp_path / "run"
    job, out = _sbatch_tiny(slurm_cluster, tmp_path, run_dir, *RUN)
    state = slurm_cluster.wait(job, timeout=150)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{_read(out)}"
    _check_finished_run(run_dir, reference)
    assert f'"final": "{run_dir}/final"' in _read(out)


def test_es_tiny_job_signalled_mid_run_requeues_and_resumes(slurm_cluster, tmp_path, reference):
    """USR2 to the ranks (what --signal=USR2@180 sends before the time limit): they checkpoint and exit 75,
    the script requeues the job, and the second start resumes from run_dir."""
    run_dir = tmp_path / "run"
    job, out = _sbatch_tiny(slurm_cluster, tmp_path, run_dir, *RUN)
    _wait_for_iterations(run_dir, 2, job, slurm_cluster)
    slurm_cluster.signal(job, "USR2", batch=False)  # the job's steps, not the batch shell
    state = slurm_cluster.wait(job, timeout=150)
    text = _read(out)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text}"
    assert "exit 75" in text and f"job {job} requeued" in text, text
    assert "(restart 1)" in text and "hpc_es: resuming" in text, text
    _check_finished_run(run_dir, reference)


def test_es_tiny_job_requeued_by_scontrol_resumes(slurm_cluster, tmp_path, reference):
    """``scontrol requeue`` (what an admin or a preemption does): Slurm sends SIGTERM to the job, the ranks
    checkpoint, and the restarted job resumes from run_dir; nothing is lost or doubled."""
    run_dir = tmp_path / "run"
    job, out = _sbatch_tiny(slurm_cluster, tmp_path, run_dir, *RUN)
    _wait_for_iterations(run_dir, 2, job, slurm_cluster)
    slurm_cluster.requeue(job)
    state = slurm_cluster.wait(job, timeout=180)
    text = _read(out)
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text}"
    assert "(restart 1)" in text and "hpc_es: resuming" in text, text
    ledger = _check_finished_run(run_dir, reference)
    np.testing.assert_array_equal(ledger["iteration"], np.arange(10))  # every iteration exactly once


def test_python_submit_requeued_mid_run_resumes(slurm_cluster, tmp_path, reference):
    """hpc_es.submit on Slurm with 2 tasks; USR2 mid-run goes through submitit's checkpoint/requeue."""
    import hpc_es

    run_dir = tmp_path / "run"
    with slurm_cluster.environ():
        job = hpc_es.submit(CONFIG, overrides=RUN, run_dir=str(run_dir), cluster="slurm", tasks_per_node=2,
                            cpus_per_task=1, mem_gb=2, time=10)
        _wait_for_iterations(run_dir, 2, job.job_id, slurm_cluster)
        slurm_cluster.signal(job.job_id, "USR2", batch=False)
        state = slurm_cluster.wait(job.job_id, timeout=150)
        log = _read(run_dir / "submitit" / f"{job.job_id}_0_log.err")
        assert state == "COMPLETED", f"job {job.job_id} ended {state}:\n{log}"
        res = hpc_es.result(job)
    assert "Caught signal SIGUSR2" in log and "hpc_es: resuming" in log, log
    assert res["final_dir"] == str(run_dir / "final") and res["world_size"] == 2
    assert res["fingerprint"] == reference
    _check_finished_run(run_dir, reference)


@pytest.mark.parametrize("case", ["missing model", "unwritable run dir"])
def test_es_tiny_bad_input_fails_at_once(slurm_cluster, tmp_path, case):
    run_dir, env = tmp_path / "run", {}
    if case == "missing model":
        env["HPC_ES_MODEL"] = str(tmp_path / "no-such-model")
        expected = f"hpc_es: error: model folder '{tmp_path}/no-such-model' does not exist"
    else:
        (tmp_path / "a-file").write_text("")
        run_dir = tmp_path / "a-file" / "run"  # unwritable even for root
        expected = f"hpc_es: error: cannot create run folder '{run_dir}'"
    start = time.monotonic()
    job, out = _sbatch_tiny(slurm_cluster, tmp_path, run_dir, **env)
    state = slurm_cluster.wait(job, timeout=60)
    text = _read(out)
    assert state == "FAILED", f"job {job} ended {state}:\n{text}"
    assert expected in text and "stopped before launching any rank" in text, text
    assert "srun" not in text
    assert time.monotonic() - start < 30


def test_python_submit_shared_setup_error_fails_every_rank_without_an_abort(slurm_cluster, tmp_path):
    """A set-up error that every rank hits alike (here: a model folder that does not exist) under submitit:
    rank 0 reports it once, every rank raises it to submitit, and nobody calls MPI_Abort."""
    import hpc_es

    run_dir, missing = tmp_path / "run", tmp_path / "no-such-model"
    with slurm_cluster.environ():
        job = hpc_es.submit(CONFIG, overrides=RUN, run_dir=str(run_dir), model=str(missing), cluster="slurm",
                            tasks_per_node=2, cpus_per_task=1, mem_gb=2, time=5)
        state = slurm_cluster.wait(job.job_id, timeout=120)
        logs = [_read(run_dir / "submitit" / f"{job.job_id}_0_log.err"),
                _read(run_dir / "submitit" / f"{job.job_id}_1_log.err")]
        with pytest.raises(Exception, match="does not exist") as failed:
            hpc_es.result(job)
    assert state == "FAILED", f"job {job.job_id} ended {state}:\n{logs}"
    assert "no-such-model" in str(failed.value)
    text = "\n".join(logs)
    assert "MPI_ABORT" not in text.upper(), text
    assert logs[0].count(f"hpc_es: error: model directory '{missing}' does not exist") == 1, logs[0]
    assert "hpc_es: error:" not in logs[1], logs[1]
