"""Ranks started with different settings stop at set-up, naming the keys that differ (issue 24)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import PY, ROOT, SMALL, mpiexec
from hpc_es.checks import check_same_setup, data_digest
from hpc_es.comm import Comm
from hpc_es.config import load_config
from hpc_es.errors import DistributedError
from hpc_es.tasks import Example


class Ranks(Comm):
    """Rank 0 of a world whose other ranks contribute ``others`` to allgather."""

    def __init__(self, others: list[bytes]) -> None:
        super().__init__()
        self.others, self.world_size = others, 1 + len(others)

    def allgather(self, payload: bytes) -> list[bytes]:
        return [payload] + self.others


def payload(overrides: list[str], examples: list[Example]) -> bytes:
    sent: list[bytes] = []

    class Capture(Comm):
        def __init__(self) -> None:
            super().__init__()
            self.world_size = 2

        def allgather(self, p: bytes) -> list[bytes]:
            sent.append(p)
            return [p, p]

    check_same_setup(Capture(), load_config(None, SMALL + overrides).to_json(), data_digest(examples))
    return sent[0]


DATA = [Example("Q: 1\nA:", {"target": 1}), Example("Q: 2\nA:", {"target": 2})]


def test_the_same_setup_passes() -> None:
    cfg = load_config(None, SMALL).to_json()
    check_same_setup(Ranks([payload([], DATA), payload([], DATA)]), cfg, data_digest(DATA))


@pytest.mark.parametrize("other, data, words", [
    (["es.sigma=0.01"], DATA, "rank 1 was started with a different es.sigma than rank 0"),
    (["rollout.max_new_tokens=5", "task=countdown"], DATA, "different rollout.max_new_tokens, task than rank 0"),
    ([], DATA[:1], "different the data (train examples) than rank 0"),
])
def test_ranks_that_differ_are_named(other: list[str], data: list[Example], words: str) -> None:
    cfg = load_config(None, SMALL).to_json()
    with pytest.raises(DistributedError) as e:
        check_same_setup(Ranks([payload(other, data)]), cfg, data_digest(DATA))
    assert words in str(e.value)


@pytest.mark.integration
def test_two_ranks_with_different_sigma_stop_before_training(tmp_path: Path) -> None:
    """A real two-rank launch (MPMD: each rank its own command line) stops at set-up with one line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = SMALL + [f"run_dir={tmp_path / 'run'}", "es.iterations=2", "dist.backend=mpi"]
    launcher = mpiexec(1)
    cmd = launcher + [PY, "-m", "hpc_es", *args, "es.sigma=0.05", ":", "-n", "1", PY, "-m", "hpc_es", *args,
                      "es.sigma=0.01"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpc_es: error")]
    assert lines == ["hpc_es: error: rank 1 was started with a different es.sigma than rank 0; every rank must be "
                     "given the same config and data"], proc.stderr
    assert not (tmp_path / "run" / "log.h5").exists()
