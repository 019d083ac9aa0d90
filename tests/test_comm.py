"""The communication layer: the single-process Comm, backend detection, member-to-slot assignment and byte
accounting.  The multi-rank collectives are exercised for real (mpiexec, torchrun) by a small script."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import PY, ROOT, mpiexec
from hpc_es.comm import LENGTH_BYTES, Comm, detect_backend, make_comm
from hpc_es.config import load_config
from hpc_es.errors import DistributedError
from hpc_es.placement import slot_owner
from hpc_es.trainer import Trainer

LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK", "PMIX_RANK",
               "MPI_LOCALNRANKS", "HYDRA_CONTROL_FD", "TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK",
               "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID",
               "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No launcher variables: as if started by hand."""
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# ---- the single-process Comm ---------------------------------------------------------------------

def test_single_process_comm_is_the_identity() -> None:
    c = Comm()
    assert (c.rank, c.world_size, c.local_rank, c.local_size, c.is_main, c.name) == (0, 1, 0, 1, True, "none")
    x = np.array([1.5, -2.0, 3.25], dtype=np.float64)
    out = c.allreduce_sum(x)
    assert out.dtype == np.float64 and np.array_equal(out, x)
    out[0] = 99.0
    assert x[0] == 1.5, "allreduce_sum must return a copy"
    assert c.allgather(b"hello") == [b"hello"]
    assert c.allgather(b"") == [b""]
    c.barrier()
    c.close()


def test_single_process_comm_counts_bytes_like_the_wire_protocol() -> None:
    c = Comm()
    assert c.bytes_sent == 0
    c.allreduce_sum(np.zeros(6))
    assert c.bytes_sent == 6 * 8
    c.allgather(b"x" * 16)
    assert c.bytes_sent == 6 * 8 + LENGTH_BYTES + 16
    c.barrier()
    assert c.bytes_sent == 6 * 8 + LENGTH_BYTES + 16


def test_allreduce_accepts_other_dtypes_as_float64() -> None:
    out = Comm().allreduce_sum(np.array([1, 2, 3], dtype=np.int32))
    assert out.dtype == np.float64 and out.tolist() == [1.0, 2.0, 3.0]


# ---- backend detection ---------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, "none"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),          # Open MPI's mpirun / mpiexec
    ({"PMI_SIZE": "2"}, "mpi"),                      # MPICH / Intel MPI / srun --mpi=pmi2
    ({"PMIX_RANK": "0"}, "mpi"),                     # srun --mpi=pmix
    ({"HYDRA_CONTROL_FD": "5"}, "mpi"),              # MPICH hydra
    ({"TORCHELASTIC_RUN_ID": "abc"}, "torch"),       # torchrun
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "torch"),  # env:// by hand
    ({"RANK": "0", "WORLD_SIZE": "2"}, "none"),      # incomplete env:// is not a launch
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "none"),  # srun alone is neither (make_comm refuses)
    ({"OMPI_COMM_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc"}, "mpi"),
])
def test_detect_backend(clean_env: pytest.MonkeyPatch, env: dict[str, str], expected: str) -> None:
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert detect_backend() == expected


def test_make_comm_none_and_auto_without_launcher(clean_env: pytest.MonkeyPatch) -> None:
    for backend in ("none", "auto"):
        c = make_comm(backend)
        assert type(c) is Comm and c.world_size == 1


def test_forced_none_backend_ignores_launcher_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert type(make_comm("none")) is Comm


def test_srun_without_mpi_or_torch_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SLURM_PROCID", "1")
    clean_env.setenv("SLURM_NTASKS", "4")
    with pytest.raises(DistributedError, match="task 1 of 4 Slurm tasks"):
        make_comm("auto")


def test_forced_torch_backend_without_rendezvous_names_the_missing_variable(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(DistributedError, match="RANK"):
        make_comm("torch")


# ---- members to slots ----------------------------------------------------------------------------

def test_slot_owner_gives_every_member_exactly_one_balanced_slot() -> None:
    for world in range(1, 9):
        for per_rank in range(1, 5):
            for n in range(1, 41):
                owners = [slot_owner(m, world, per_rank) for m in range(n)]
                for rank, replica in owners:
                    assert 0 <= rank < world and 0 <= replica < per_rank
                per_rank_load = np.bincount([r for r, _ in owners], minlength=world)
                assert per_rank_load.sum() == n
                assert per_rank_load.max() - per_rank_load.min() <= 1, (n, world, per_rank)
                if n >= world:
                    assert per_rank_load.min() >= 1, f"a rank idles with N={n}, {world} ranks, {per_rank}/rank"
                for rank in range(world):
                    reps = [j for r, j in owners if r == rank]
                    load = np.bincount(reps, minlength=per_rank)
                    assert load.max() - load.min() <= 1, (n, world, per_rank, rank)
                    if len(reps) >= per_rank:
                        assert load.min() >= 1, f"replica idles with N={n}, {world} ranks, {per_rank}/rank"


def test_slot_owner_is_a_pure_function() -> None:
    assert [slot_owner(m, 3, 2) for m in range(7)] == [slot_owner(m, 3, 2) for m in range(7)]
    assert [slot_owner(m, 1, 1) for m in range(5)] == [(0, 0)] * 5


class _FakeWorld(Comm):
    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world


@pytest.mark.parametrize("rank", [0, 2])
def test_more_ranks_than_members_is_a_clear_error_on_every_rank(rank: int, tmp_path: Path) -> None:
    cfg = load_config(None, ["es.population_size=2", f"run_dir={tmp_path}", "device=cpu"])
    with pytest.raises(DistributedError, match="3 ranks but only 2 population members.*allow_idle_ranks"):
        Trainer(cfg, _FakeWorld(rank, 3))


# ---- real multi-rank collectives ---------------------------------------------------------------

COMM_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from hpc_es.comm import SetupFailed, agree, make_comm
    from hpc_es.errors import HpcEsError
    c = make_comm(sys.argv[1])
    r = c.rank
    total = c.allreduce_sum(np.array([r + 1.0, 0.5, float(r == 0)]))
    after_reduce = c.bytes_sent
    got = c.allgather(b"r" * (3 * r))      # unequal lengths, rank 0 sends nothing
    empty = c.allgather(b"")
    c.barrier()
    sent = c.bytes_sent
    agreed = []
    for err in (None, HpcEsError("bad run_dir"), RuntimeError("only me") if r == 1 else None,
                HpcEsError(f"differs on {r}")):
        try:
            agree(c, err)
            agreed.append(None)
        except (SetupFailed, HpcEsError) as e:  # (one process: the rank's own error comes back as it is)
            agreed.append([str(e), e.exit_code, err is not None and (e is err or e.__cause__ is err)])
    with open(f"{sys.argv[2]}/rank{r}.json", "w") as fh:  # one file a rank: stdout lines can interleave
        json.dump({"rank": r, "world": c.world_size, "name": c.name, "total": total.tolist(),
                   "got": [g.decode() for g in got], "empty": [e.decode() for e in empty],
                   "after_reduce": after_reduce, "bytes": sent, "agreed": agreed}, fh)
    c.close()
""")


def _run_comm_script(launcher: list[str], backend: str, tmp_path: Path) -> list[dict]:
    script = tmp_path / "comm_check.py"
    script.write_text(COMM_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(launcher + [str(script), backend, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    return sorted(rows, key=lambda d: d["rank"])


@pytest.mark.integration
@pytest.mark.parametrize("launch", ["mpiexec", "torchrun"])
def test_two_rank_collectives_and_byte_counts(launch: str, tmp_path: Path) -> None:
    if launch == "mpiexec":
        launcher, backend = mpiexec(2) + [PY], "mpi"
    else:
        launcher = [str(Path(PY).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
        backend = "torch"
    rows = _run_comm_script(launcher, backend, tmp_path)
    assert [d["rank"] for d in rows] == [0, 1]
    for d in rows:
        assert d["world"] == 2 and d["name"] == backend
        assert d["total"] == [3.0, 1.0, 1.0]
        assert d["got"] == ["", "rrr"]
        assert d["empty"] == ["", ""]
        assert d["after_reduce"] == 3 * 8
        # each allgather: the 8-byte length, then the payload padded to the longest (3, then 0 bytes)
        assert d["bytes"] == 3 * 8 + (LENGTH_BYTES + 3) + LENGTH_BYTES
        # setup agreement: nothing failed; all failed alike (reads as one process); one rank failed
        # (named, with its exit status); ranks failed differently (each named, the lowest rank's status)
        assert d["agreed"][0] is None
        assert d["agreed"][1] == ["bad run_dir", 2, True]  # each rank keeps its own error as the cause
        assert d["agreed"][2] == ["rank 1 failed: RuntimeError: only me", 1, d["rank"] == 1]
        assert d["agreed"][3] == ["rank 0 failed: differs on 0; rank 1 failed: differs on 1", 2, True]


@pytest.mark.integration
def test_forced_mpi_backend_without_a_launcher_is_a_world_of_one(tmp_path: Path) -> None:
    rows = _run_comm_script([PY], "mpi", tmp_path)
    assert len(rows) == 1 and rows[0]["world"] == 1 and rows[0]["name"] == "mpi"
    assert rows[0]["total"] == [1.0, 0.5, 1.0] and rows[0]["got"] == [""]
    assert rows[0]["agreed"] == [None, ["bad run_dir", 2, True], None, ["differs on 0", 2, True]]
