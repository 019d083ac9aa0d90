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

from conftest import PY, ROOT, TINY, fingerprint_of, ledger_arrays, mpiexec, run_hpc_es

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


# ---- whole runs ---------------------------------------------------------------------------------

ITERS = 4
RUN = TINY + [f"es.iterations={ITERS}", "checkpoint.every=1"]


def run_args(run_dir: Path, extra: list[str] = ()) -> list[str]:
    return RUN + list(extra) + [f"run_dir={run_dir}"]


def start(run_dir: Path, fault: str, extra: list[str] = (), launcher: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen((launcher or []) + [PY, "-m", "hpc_es"] + run_args(run_dir, extra), cwd=ROOT,
                            env=dict(ENV, HPC_ES_FAULT=fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_rows(run_dir: Path, rows: int, proc: subprocess.Popen, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if len(ledger_arrays(run_dir)["iteration"]) >= rows:
                return
        except (OSError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no {rows} ledger rows in {limit_s} s")


def finish(proc: subprocess.Popen, limit_s: float = 120) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=limit_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, err, time.monotonic() - t0


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("guards") / "ref"
    run_hpc_es(run_args(run_dir), env={"HPC_ES_FAULT": ""}, check=True)
    return run_dir


def resumes_exactly(run_dir: Path, ref: Path) -> None:
    proc = run_hpc_es(run_args(run_dir), env={"HPC_ES_FAULT": ""})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["fingerprint"] == fingerprint_of(ref / "final")
    assert ledger_arrays(run_dir)["iteration"].tolist() == list(range(ITERS))


def test_a_second_run_on_a_busy_run_dir_is_refused_at_once_and_a_killed_run_resumes(ref: Path,
                                                                                   tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = start(run_dir, "hang:2")  # alive, and stuck in iteration 2
    try:
        wait_for_rows(run_dir, 2, first)
        second = run_hpc_es(run_args(run_dir, ["seed=7"]), env={"HPC_ES_FAULT": ""}, timeout=60)
        assert second.returncode == 2
        assert [ln for ln in second.stderr.splitlines() if ln.startswith("hpc_es:")] == [
            (f"hpc_es: error: run_dir '{run_dir}' is in use by another run (host {socket.gethostname()}, "
             f"pid {first.pid}, started " + second.stderr.split("started ")[1].split(")")[0] + "); wait for it "
             "to end or use another run_dir")]
        assert ledger_arrays(run_dir)["iteration"].tolist() == [0, 1]  # the second run wrote nothing
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # as kill -9 or a lost node would: the lock goes with it
        first.communicate()
    resumes_exactly(run_dir, ref)


def test_sigterm_during_a_stuck_iteration_exits_75_within_the_grace_and_resumes(ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start(run_dir, "signal:1,hang:1", ["checkpoint.stop_grace_s=1"])
    code, err, seconds = finish(proc)
    assert code == 75, err
    assert ("hpc_es: rank 0: the iteration in flight did not end within checkpoint.stop_grace_s=1 s of SIGTERM; "
            "leaving without it; exit 75 (the resumed run repeats it)") in err
    assert seconds < 60
    assert ledger_arrays(run_dir)["iteration"].tolist() == [0]
    resumes_exactly(run_dir, ref)


def test_sigterm_while_the_model_loads_exits_75_with_nothing_to_save(ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, err, _ = finish(start(run_dir, "signal:-1"))
    assert code == 75, err
    assert err.splitlines()[-1] == ("hpc_es: got SIGTERM while setting up; nothing to save yet; exit 75 "
                                    "(requeue to resume)")
    assert not (run_dir / "log.h5").exists()
    resumes_exactly(run_dir, ref)


@pytest.mark.parametrize("kind, hung", [("mpi", 1), ("torch", 0)])
def test_a_hung_rank_stops_the_whole_run_naming_it(kind: str, hung: int, ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    launcher = mpiexec(2) if kind == "mpi" else [TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    cmd = launcher + ([PY] if kind == "mpi" else []) + ["-m", "hpc_es"] + run_args(
        run_dir, ["dist.timeout_s=3", "checkpoint.stop_grace_s=1"])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, HPC_ES_FAULT=f"hang:2:{hung}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    code, err, seconds = finish(proc)
    errors = [ln.lstrip("\x00") for ln in err.splitlines() if "hpc_es: error:" in ln]
    assert code != 0 and seconds < 90, err
    assert len(errors) == 1, err
    assert errors[0].startswith(f"hpc_es: error: rank(s) {hung} did not reach all-reduce #"), errors[0]
    assert f"within dist.timeout_s=3 s (hung or stuck in their own work; rank(s) {1 - hung} waited)" in errors[0]
    assert ledger_arrays(run_dir)["iteration"].tolist() == [0, 1]
    resumes_exactly(run_dir, ref)


def test_sigusr2_to_mpiexec_and_ctrl_c_under_mpiexec_end_like_one_process(ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start(run_dir, "hang:2", ["checkpoint.stop_grace_s=1"], launcher=mpiexec(2))
    wait_for_rows(run_dir, 2, proc)
    os.kill(proc.pid, signal.SIGUSR2)  # to mpiexec only: Open MPI forwards it to the ranks
    code, err, _ = finish(proc)
    assert code == 75, err
    assert "MPI_ABORT" not in err
    proc = start(run_dir, "hang:3", ["checkpoint.stop_grace_s=1"], launcher=mpiexec(2))
    wait_for_rows(run_dir, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    code, err, _ = finish(proc)
    assert code != 0 and "MPI_ABORT" not in err and "Traceback" not in err, err
    resumes_exactly(run_dir, ref)
