"""Issue 16 with real processes: one run per run_dir (a lock the kernel drops when its holder dies), and a
rank that hangs under mpiexec or torchrun stops the job within dist.timeout_s, naming the hung rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from conftest import PY, ROOT, mpiexec

pytestmark = pytest.mark.integration

TORCHRUN = str(Path(PY).parent / "torchrun")
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

HOLDER = textwrap.dedent("""
    import sys, time
    from hpc_es.runlock import acquire
    lock = acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(120)
""")


def try_lock(run_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom hpc_es.runlock import acquire\nfrom hpc_es.errors import HpcEsError\n"
            "try:\n    acquire(sys.argv[1])\nexcept HpcEsError as e:\n    print(e)\n    sys.exit(2)\nprint('ok')")
    return subprocess.run([PY, "-c", code, str(run_dir)], env=dict(ENV, **(env or {})), capture_output=True,
                          text=True, timeout=60, check=False)


def start_holder(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([PY, "-c", HOLDER, str(run_dir)], env=dict(ENV, SLURM_JOB_ID="4242"),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_frees_the_run_dir(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        second = try_lock(tmp_path)
        assert second.returncode == 2
        assert second.stdout.startswith(f"run_dir '{tmp_path}' is in use by another run (host {socket.gethostname()}, "
                                        f"pid {holder.pid}, Slurm job 4242, started ")
        assert second.stdout.rstrip().endswith("wait for it to end or use another run_dir")
    finally:
        holder.send_signal(signal.SIGKILL)  # as a node loss or kill -9 would
        holder.wait()
    assert (tmp_path / ".lock").exists()  # the stale file stays, and blocks nothing
    assert try_lock(tmp_path).stdout.strip() == "ok"


def test_the_lock_can_be_switched_off(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        assert try_lock(tmp_path, {"HPC_ES_RUN_LOCK": "off"}).stdout.strip() == "ok"
    finally:
        holder.kill()
        holder.wait()


HANG = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from hpc_es.comm import CollectiveTimeout, make_comm
    c = make_comm(sys.argv[1], timeout_s=2.0)
    c.allreduce_sum(np.ones(2))
    out = {"rank": c.rank}
    if c.rank == int(sys.argv[3]):
        time.sleep(25)  # the hung rank: never reaches the next collective in time
    else:
        t0, cpu0 = time.monotonic(), time.process_time()
        try:
            c.allreduce_sum(np.ones(2))
        except CollectiveTimeout as e:
            out.update(message=str(e), reporter=e.reporter, wall=time.monotonic() - t0,
                       cpu=time.process_time() - cpu0)
    with open(f"{sys.argv[2]}/rank{c.rank}.json", "w") as fh:
        json.dump(out, fh)
    import os
    os._exit(0)
""")


@pytest.mark.parametrize("kind, hung", [("mpi", 1), ("mpi", 0), ("torch", 0)])
def test_a_hung_rank_is_named_within_the_timeout(kind: str, hung: int, tmp_path: Path) -> None:
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    launcher = mpiexec(3) if kind == "mpi" else [TORCHRUN, "--standalone", "--nproc_per_node", "3"]
    py = [PY] if kind == "mpi" else []
    proc = subprocess.Popen(launcher + py + [str(script), "auto", str(tmp_path), str(hung)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        waiting = [r for r in range(3) if r != hung]
        while time.monotonic() < deadline and not all((tmp_path / f"rank{r}.json").exists() for r in waiting):
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the hung rank with it
        proc.wait()
    for r in waiting:
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["message"] == (f"rank(s) {hung} did not reach all-reduce #2 within dist.timeout_s=2 s (hung or "
                                  f"stuck in their own work; rank(s) {', '.join(map(str, waiting))} waited)")
        assert got["reporter"] == waiting[0]
        assert 2.0 <= got["wall"] < 15
        assert got["cpu"] < 0.5 * got["wall"], got  # waiting ranks sleep between polls, they do not spin


def test_submit_when_the_slurm_controller_does_not_answer_is_one_line(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):  # Slurm's client tools are installed, its controller is down
        (bin_dir / tool).write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Unable to contact "
                                    "slurm controller (connect failure)' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    env = dict(ENV, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([PY, "-m", "hpc_es", "submit", "es.iterations=1", f"run_dir={tmp_path / 'run'}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr == ("hpc_es: error: submitting to slurm failed: sbatch: error: Batch job submission failed: "
                           "Unable to contact slurm controller (connect failure) (is the Slurm controller reachable? "
                           "try `sinfo`; or run on this machine with --cluster local)\n")
