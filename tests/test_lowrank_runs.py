"""es.noise=lowrank end to end with real processes: replay, mpiexec, torchrun, kill -9 and resume.

Each must reproduce one uninterrupted single-process low-rank run bit for bit (fingerprint of final/).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, fingerprint_of, ledger_arrays, mpiexec, run_hpc_es
from test_distributed import launch

pytestmark = pytest.mark.integration

# Rank 2 factors, antithetic pairs, embeddings and 1-D parameters perturbed too: every path of the mode.
LOWRANK = TINY + ["es.noise=lowrank", "es.rank=2", "es.lowrank_scope=full", "es.antithetic=true",
                  "es.iterations=4", "checkpoint.every=1"]


def summary(proc) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_run(run_dir: Path, ref: Path) -> None:
    assert fingerprint_of(run_dir / "final") == fingerprint_of(ref / "final")
    got, want = ledger_arrays(run_dir), ledger_arrays(ref)
    assert got["iteration"].tolist() == [0, 1, 2, 3]
    for key in ("seeds", "signs", "rewards", "shaped"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("lowrank") / "ref"
    proc = run_hpc_es(LOWRANK + [f"run_dir={run_dir}"], env={"HPC_ES_FAULT": ""})
    assert summary(proc)["iterations"] == 4
    assert re.search(r"; low-rank: \d+ of \d+ members per pass \(as many as fit: [\d.]+ GiB free on cpu", proc.stderr)
    return run_dir


def test_ledger_names_the_mode_and_replay_rebuilds_the_model(ref: Path, tmp_path: Path) -> None:
    led = ledger_arrays(ref)
    assert (led["attrs"]["noise"], led["attrs"]["noise_rank"], led["attrs"]["noise_scope"]) == ("lowrank", 2, "full")
    assert json.loads(led["attrs"]["config"])["es"]["noise"] == "lowrank"
    assert len(set(np.round(led["rewards"].ravel(), 6))) > 1  # the members really differ
    proc = run_hpc_es(["replay", str(ref), "--out", str(tmp_path / "replayed")], check=True)
    assert "Traceback" not in proc.stderr
    assert fingerprint_of(tmp_path / "replayed") == fingerprint_of(ref / "final")


@pytest.mark.parametrize("kind", ["mpi", "torch"])
def test_two_ranks_reproduce_one_process(kind: str, ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc, _ = launch(kind, 2, LOWRANK + [f"run_dir={run_dir}"], env={"HPC_ES_FAULT": ""})
    summary(proc)
    assert_same_run(run_dir, ref)
    assert (ledger_arrays(run_dir)["world_size"] == 2).all()


def test_kill_9_then_resume_equals_uninterrupted(ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_hpc_es(LOWRANK + [f"run_dir={run_dir}"], env={"HPC_ES_FAULT": "rollout:2"})
    assert proc.returncode == -9, proc.stderr
    assert not (run_dir / "final").exists()
    proc = run_hpc_es(LOWRANK + [f"run_dir={run_dir}"], env={"HPC_ES_FAULT": ""})
    summary(proc)
    assert "resuming" in proc.stderr
    assert_same_run(run_dir, ref)


def test_resume_refuses_another_noise_kind(ref: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    proc = run_hpc_es(LOWRANK + ["es.iterations=5", "es.rank=1", f"run_dir={run_dir}"], env={"HPC_ES_FAULT": ""})
    assert proc.returncode != 0
    assert "hpc_es: error:" in proc.stderr and "es.rank" in proc.stderr, proc.stderr


def test_mpi_two_ranks_two_replicas_each(ref: Path, tmp_path: Path) -> None:
    """Four slots (two per rank), members scored per replica in their own batched pass."""
    run_dir = tmp_path / "run"
    proc = run_hpc_es(LOWRANK + ["dist.replicas_per_device=2", f"run_dir={run_dir}"], env={"HPC_ES_FAULT": ""},
                      launcher=mpiexec(2))
    summary(proc)
    assert_same_run(run_dir, ref)


def test_bench_lowrank_json_and_gpu_check_rows_on_cpu(tmp_path: Path) -> None:
    import subprocess

    from conftest import PY, ROOT

    tiny = ["--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--prompts", "2", "--tokens", "4",
            "--iterations", "1", "--warmup", "0", "--n", "4"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([PY, str(ROOT / "tools" / "bench_lowrank.py"), *tiny, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["n"] == 4 and got["lowrank_over_full"] > 0
    assert got["full_s"]["perturb"] > 0 and got["lowrank_s"]["perturb"] >= 0 and got["lowrank_s"]["update"] > 0
    proc = subprocess.run([PY, str(ROOT / "tools" / "bench.py"), *tiny, "--no-baseline", "--lowrank",
                           "--lowrank-n", "4", "--lowrank-prompts", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "low-rank vs full-rank ES" in proc.stdout and "N=4, 2 prompts, 4 new tokens, rank 1" in proc.stdout
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([PY, str(ROOT / "tools" / "gpu_check.py"), "--tiny", "--n", "2", "--prompts", "2", "--tokens",
                           "2", "--warmup", "0", "--no-baseline", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "low-rank population throughput" in proc.stdout and "% of plain" in proc.stdout
    low = json.loads(out.read_text())["phases"]["lowrank"]["result"]
    assert low["engine"] == "fast" and low["rows"] == 16 and low["lowrank_fraction_of_plain"] > 0
    assert low["rows_identical_fast_vs_hooks"] == 1.0  # fp32 on the CPU: the fast pass gives the hooks' tokens


def test_hf_engine_with_hooks_gives_the_same_run(ref: Path, tmp_path: Path) -> None:
    """rollout.engine=hf (forward hooks) against the reference on the fast engine (native low-rank passes):
    the same rewards, hence the same weights."""
    run_dir = tmp_path / "run"
    summary(run_hpc_es(LOWRANK + ["rollout.engine=hf", f"run_dir={run_dir}"], env={"HPC_ES_FAULT": ""}))
    assert (ledger_arrays(ref)["attrs"]["rollout_engine"], ledger_arrays(run_dir)["attrs"]["rollout_engine"]) == \
        ("fast", "hf")
    assert_same_run(run_dir, ref)


def test_rank_shaping_is_logged_and_replayed(tmp_path: Path) -> None:
    """es.shaping=rank in low-rank mode: the ledger's shaped column is the centered ranks of its rewards, and
    replay from the ledger alone rebuilds the trained weights bit for bit."""
    from hpc_es.es import shape_rewards

    run_dir = tmp_path / "run"
    summary(run_hpc_es(LOWRANK + ["es.shaping=rank", "es.iterations=2", f"run_dir={run_dir}"],
                       env={"HPC_ES_FAULT": ""}))
    led = ledger_arrays(run_dir)
    for rewards, shaped in zip(led["rewards"], led["shaped"]):
        np.testing.assert_array_equal(shaped, shape_rewards(rewards, "rank"))
    assert len(set(led["shaped"][0].tolist())) > 2
    run_hpc_es(["replay", str(run_dir), "--out", str(tmp_path / "replayed")], check=True)
    assert fingerprint_of(tmp_path / "replayed") == fingerprint_of(run_dir / "final")
