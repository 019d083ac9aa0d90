"""Pytest helper: a real single-node Slurm cluster for tests.

Import the fixture in ``tests/conftest.py``::

    from slurm_cluster import slurm_cluster  # noqa: F401

and use it in a test::

    def test_something(slurm_cluster, tmp_path):
        job = slurm_cluster.submit(script, "arg1", env={"FOO": "1"})
        assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"

Where the cluster comes from, in this order:

1. ``HPC_ES_SLURM_ENV`` names an ``env.sh`` written by ``.ci/slurm-up.sh``:
   that running cluster is used and left running afterwards.
2. ``slurmctld`` is installed (and we are root): ``.ci/slurm-up.sh`` brings a
   cluster up in a fresh temporary folder (no package installation) and
   ``.ci/slurm-down.sh`` stops it when the session ends.  Set
   ``HPC_ES_SLURM_KEEP=1`` to keep that folder (logs) afterwards.
3. Otherwise the tests are skipped ("Slurm binaries absent: ..."), except
   when ``CI=true``: then they fail, so that CI never silently skips them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
UP_SCRIPT = REPO_ROOT / ".ci" / "slurm-up.sh"
DOWN_SCRIPT = REPO_ROOT / ".ci" / "slurm-down.sh"

ENV_VAR = "HPC_ES_SLURM_ENV"
UP_TIMEOUT_S = 240  # includes a possible first start of mariadb

#: Job states after which a job does not run again by itself.
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
        "SPECIAL_EXIT",
    }
)

#: Pending reasons that mean the job will never start on this cluster.
HOPELESS_REASONS = frozenset(
    {
        "PartitionConfig",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "BadConstraints",
        "InvalidAccount",
        "InvalidQOS",
    }
)


class SlurmError(RuntimeError):
    """A Slurm client command failed."""


def _load_env_sh(env_sh: Path) -> dict[str, str]:
    """The environment after sourcing ``env_sh`` on top of ``os.environ``."""
    out = subprocess.run(
        ["bash", "-c", 'set -e; source "$1"; env -0', "bash", str(env_sh)],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    env: dict[str, str] = {}
    for item in out.split(b"\0"):
        if b"=" in item:
            key, _, value = item.partition(b"=")
            env[key.decode()] = value.decode(errors="surrogateescape")
    # Bash adds a few variables of its own; keep the caller's view otherwise.
    for key in ("SHLVL", "_", "PWD", "OLDPWD"):
        if key in os.environ:
            env[key] = os.environ[key]
        else:
            env.pop(key, None)
    return env


class SlurmCluster:
    """A handle on a running cluster; all commands run with :attr:`env`."""

    def __init__(self, env_sh: Path, owned_dir: Path | None = None) -> None:
        self.env_sh = Path(env_sh)
        #: Full environment (``os.environ`` plus ``env.sh``) for sbatch, squeue, sacct ...
        self.env: dict[str, str] = _load_env_sh(self.env_sh)
        #: Folder of the cluster started by the fixture (None when reused).
        self.dir: Path | None = owned_dir
        if "SLURM_CONF" not in self.env:
            raise SlurmError(f"{env_sh} does not export SLURM_CONF")
        #: MPI plugin the cluster uses by default ("pmix" or "none").
        self.mpi: str = self.env.get("HPC_ES_SLURM_MPI", "pmix")

    # ------------------------------------------------------------------ basics
    def run(
        self, *cmd: str, timeout: float = 30, check: bool = True, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command with the cluster environment (plus ``env``)."""
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        proc = subprocess.run(
            list(cmd), env=full_env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(cmd)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
            )
        return proc

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """Temporarily put the cluster's variables into ``os.environ``.

        For code that calls sbatch itself (e.g. submitit) in this process.
        """
        keys = [k for k, v in self.env.items() if os.environ.get(k) != v]
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: self.env[k] for k in keys})
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    # -------------------------------------------------------------------- jobs
    def submit(
        self,
        script_path: str | os.PathLike[str],
        *args: str,
        env: Mapping[str, str] | None = None,
        sbatch_args: Sequence[str] = (),
        cwd: str | os.PathLike[str] | None = None,
    ) -> str:
        """``sbatch`` a script; returns the job id.

        ``args`` go to the script, ``sbatch_args`` to sbatch (before the
        script).  ``env`` is added to the cluster environment; sbatch exports
        that whole environment into the job (``--export=ALL``, the default).
        The job's working folder is ``cwd`` (default: the script's folder).
        """
        script = Path(script_path).resolve()
        workdir = Path(cwd) if cwd is not None else script.parent
        cmd = ["sbatch", "--parsable", f"--chdir={workdir}", *sbatch_args, str(script), *map(str, args)]
        proc = self.run(*cmd, env=env)
        job_id = proc.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"unexpected sbatch output: {proc.stdout!r}")
        return job_id

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once slurmctld forgot the job)."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", proc.stdout))

    def state(self, job_id: str) -> str:
        """Current state of a job, e.g. PENDING, RUNNING, COMPLETED.

        Asks slurmctld first (scontrol), then the accounting db (sacct) once
        the controller has forgotten the job.
        """
        info = self.job_info(job_id)
        if "JobState" in info:
            return info["JobState"]
        proc = self.run(
            "sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id), check=False
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        if lines:
            # "CANCELLED by 0" -> "CANCELLED"
            return lines[-1].split()[0]
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float = 60.0, poll: float = 0.5) -> str:
        """Wait until the job is in a final state and return it.

        Raises TimeoutError when ``timeout`` passes first (the job is left
        alone), and SlurmError at once for a pending job that can never start
        on this cluster (e.g. Reason=PartitionConfig: more CPUs than the node).
        """
        return self.wait_for_state(job_id, FINAL_STATES, timeout=timeout, poll=poll)

    def wait_for_state(
        self,
        job_id: str,
        states: frozenset[str] | set[str] | Sequence[str],
        timeout: float = 60.0,
        poll: float = 0.5,
    ) -> str:
        """Wait until the job's state is one of ``states``; returns it."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState") or self.state(job_id)
            if state in wanted:
                return state
            reason = info.get("Reason", "")
            if state == "PENDING" and reason in HOPELESS_REASONS:
                raise SlurmError(
                    f"job {job_id} can never start here (Reason={reason}):\n"
                    + self.run("scontrol", "show", "job", str(job_id), check=False).stdout
                    + self.run("scontrol", "show", "node", check=False).stdout
                )
            if time.monotonic() > deadline:
                detail = self.run("scontrol", "show", "job", str(job_id), check=False).stdout
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout:.0f}s "
                    f"(waiting for {sorted(wanted)})\n{detail}"
                )
            time.sleep(poll)

    def requeue(self, job_id: str) -> None:
        """``scontrol requeue``: the job is killed and queued again.

        It restarts with SLURM_RESTART_COUNT incremented, after the cluster's
        cred_expire delay (about 11 s with .ci/slurm-up.sh).
        """
        self.run("scontrol", "requeue", str(job_id))

    def signal(self, job_id: str, sig: str = "USR2", *, batch: bool = True, full: bool = False) -> None:
        """Send a signal: to the batch shell (``batch``), to every step
        including the batch shell (``full``), or to the job steps only."""
        cmd = ["scancel", f"--signal={sig}"]
        if full:
            cmd.append("--full")
        elif batch:
            cmd.append("--batch")
        self.run(*cmd, str(job_id))

    def cancel(self, job_id: str) -> None:
        self.run("scancel", str(job_id))

    def __repr__(self) -> str:
        return f"SlurmCluster(env_sh={str(self.env_sh)!r}, owned={self.dir is not None})"


def _absent(reason: str, prefix: str = "Slurm binaries absent") -> None:
    """Skip, or fail when running in CI (CI=true)."""
    message = f"{prefix}: {reason}"
    print(message, file=sys.stderr)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true, so this is an error, not a skip)", pytrace=False)
    pytest.skip(message)


def _find(binary: str) -> str | None:
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin:/usr/local/sbin")


def _start_cluster() -> tuple[SlurmCluster, Path]:
    """Run .ci/slurm-up.sh in a fresh short temp folder (unix socket paths are short)."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    cluster_dir = Path(tempfile.mkdtemp(prefix="hpces-slurm-", dir=base))
    env = dict(os.environ, SLURM_UP_NO_INSTALL="1")
    env.pop("SLURM_CONF", None)
    try:
        proc = subprocess.run(
            ["bash", str(UP_SCRIPT), str(cluster_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        subprocess.run(["bash", str(DOWN_SCRIPT), str(cluster_dir)], capture_output=True, timeout=120)
        pytest.fail(f".ci/slurm-up.sh took over {UP_TIMEOUT_S}s; logs in {cluster_dir}/log\n{exc.stdout}",
                    pytrace=False)
    print(proc.stdout, end="", file=sys.stderr)
    if proc.returncode != 0:
        pytest.fail(
            f".ci/slurm-up.sh {cluster_dir} failed (exit {proc.returncode})\n"
            f"{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    return SlurmCluster(cluster_dir / "env.sh", owned_dir=cluster_dir), cluster_dir


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Session-wide handle on a real Slurm cluster (see the module docstring)."""
    env_sh = os.environ.get(ENV_VAR)
    if env_sh:
        path = Path(env_sh)
        if not path.is_file():
            pytest.fail(f"{ENV_VAR}={env_sh} does not exist; run .ci/slurm-up.sh DIR first", pytrace=False)
        cluster = SlurmCluster(path)
        probe = cluster.run("sinfo", "-h", "-o", "%T", check=False)
        if probe.returncode != 0:
            pytest.fail(f"cluster from {ENV_VAR}={env_sh} does not answer: {probe.stderr.strip()}", pytrace=False)
        yield cluster
        return

    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if _find(b) is None]
    if missing:
        _absent(
            f"{', '.join(missing)} not found; run `.ci/slurm-up.sh DIR` (as root, installs them) "
            f"or set {ENV_VAR}=DIR/env.sh of a running cluster"
        )
    if os.geteuid() != 0:
        _absent(
            f"need root to start a cluster with .ci/slurm-up.sh, or set {ENV_VAR}=DIR/env.sh",
            prefix="Slurm cluster unavailable",
        )

    cluster, cluster_dir = _start_cluster()
    # Later fixture instances (e.g. the fixture imported into two modules) and
    # subprocesses reuse this cluster instead of starting another one.
    os.environ[ENV_VAR] = str(cluster.env_sh)
    try:
        yield cluster
    finally:
        if os.environ.get(ENV_VAR) == str(cluster.env_sh):
            del os.environ[ENV_VAR]
        down = subprocess.run(
            ["bash", str(DOWN_SCRIPT), str(cluster_dir)], capture_output=True, text=True, timeout=180
        )
        print(down.stdout, end="", file=sys.stderr)
        if os.environ.get("HPC_ES_SLURM_KEEP") != "1" and down.returncode == 0:
            shutil.rmtree(cluster_dir, ignore_errors=True)
