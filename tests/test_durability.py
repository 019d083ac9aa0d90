"""Durability with real processes: kills, signals, resume (also with other rank/device counts), replay,
ledger-only checkpoints and damaged run directories.

Every resumed run must end bit-identical (fingerprint of final/) to one uninterrupted run, with each
iteration in the ledger exactly once.  Faults are injected deterministically with HPC_ES_FAULT.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, fingerprint_of, ledger_arrays, mpiexec, run_hpc_es

pytestmark = pytest.mark.integration

ITERS = 4
# Checkpoint after every iteration: each fault point then has an older checkpoint to fall back on.
RUN = TINY + [f"es.iterations={ITERS}", "checkpoint.every=1"]
BF16 = ["dtype=bfloat16"]


def summary(proc) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train(run_dir: Path, extra: list[str] = (), *, fault: str = "", launcher: list[str] | None = None):
    env = {"HPC_ES_FAULT": fault} if fault else {"HPC_ES_FAULT": ""}
    return run_hpc_es(RUN + list(extra) + [f"run_dir={run_dir}"], env=env, launcher=launcher)


def killed(proc) -> bool:
    """SIGKILL of the process itself (-9) or, under mpiexec, of a rank (mpiexec then exits non-zero)."""
    return proc.returncode != 0 and proc.returncode != 75 and "Traceback" not in proc.stderr


def assert_clean_error(proc, *needles: str) -> None:
    assert proc.returncode not in (0, 75), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.lower()
    assert "hpc_es: error:" in err
    for needle in needles:
        assert needle.lower() in err, proc.stderr


def assert_same_as(run_dir: Path, reference: Path, result: dict | None = None) -> None:
    """Same final weights as the reference, and a ledger with iterations 0..T-1 once each, equal to its."""
    want = fingerprint_of(reference / "final")
    assert fingerprint_of(run_dir / "final") == want
    if result is not None:
        assert result["fingerprint"] == want
        assert result["iterations"] == ITERS
    got, ref = ledger_arrays(run_dir), ledger_arrays(reference)
    assert got["iteration"].tolist() == list(range(ITERS))
    for key in ("seeds", "signs", "rewards", "shaped"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted fp32 run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("durability") / "ref"
    summary(train(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run killed right after the ledger row of iteration 2 was written, before its checkpoint:
    checkpoint at 2 iterations (weights and a ledger copy), log.h5 with 3.  Tests work on copies."""
    run_dir = tmp_path_factory.mktemp("durability") / "interrupted"
    proc = train(run_dir, ["checkpoint.every=2"], fault="after_ledger:2")
    assert proc.returncode == -9, proc.stderr
    assert ledger_arrays(run_dir)["iteration"].tolist() == [0, 1, 2]
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["iteration"] == 2
    return run_dir


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- kill -9 at every point, then the same command again ------------------------------------------
# (after_ledger: the `interrupted` fixture, resumed in test_single_rank_run_resumed_on_two_ranks)
@pytest.mark.parametrize("fault", ["rollout:2", "update:1", "checkpoint_write:2"])
def test_kill_then_resume_is_bit_identical(fault: str, ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = train(run_dir, fault=fault)
    assert proc.returncode == -9, proc.stderr
    assert not (run_dir / "final").exists()
    if fault.startswith("checkpoint_write"):
        # killed while writing the checkpoint after 3 iterations: the one after 2 is intact
        state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
        assert state["iteration"] == 2
        assert list(run_dir.glob("checkpoint.tmp-*")), "the half-written checkpoint should be left in its temp folder"
    proc = train(run_dir)
    result = summary(proc)
    assert "resuming" in proc.stderr
    assert_same_as(run_dir, ref, result)
    assert not list(run_dir.glob("checkpoint.tmp-*")) and not (run_dir / "checkpoint.old").exists()


def test_sigterm_checkpoints_exits_75_and_resumes(ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = train(run_dir, ["checkpoint.every=0"], fault="signal:1")  # a real SIGTERM during iteration 1
    assert proc.returncode == 75, proc.stderr
    assert "SIGTERM" in proc.stderr
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 2 and state["has_weights"]  # finished the iteration, then saved
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
    assert ledger_arrays(run_dir)["iteration"].tolist() == [0, 1]
    proc = train(run_dir, ["checkpoint.every=0"])
    result = summary(proc)
    assert "resuming" in proc.stderr and "at iteration 2" in proc.stderr
    assert_same_as(run_dir, ref, result)


# ---- several ranks, and resuming with another rank or device count --------------------------------
def test_mpi_kill_one_rank_then_resume_on_one_rank_two_devices(ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = train(run_dir, fault="rollout:2:1", launcher=mpiexec(2))  # SIGKILL of rank 1 in iteration 2
    assert killed(proc), proc.stderr
    assert not (run_dir / "final").exists()
    assert ledger_arrays(run_dir)["world_size"].tolist() == [2, 2]
    proc = train(run_dir, ["dist.devices_per_rank=2"])
    result = summary(proc)
    assert "resuming" in proc.stderr
    assert_same_as(run_dir, ref, result)
    assert ledger_arrays(run_dir)["slots"].tolist() == [2, 2, 2, 2]


def test_mpi_sigterm_one_rank_all_stop_then_resume_on_one_rank(ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = train(run_dir, fault="signal:1:1", launcher=mpiexec(2))  # only rank 1 is signalled
    assert proc.returncode == 75, proc.stderr
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["iteration"] == 2
    assert ledger_arrays(run_dir)["iteration"].tolist() == [0, 1]  # both ranks stopped after iteration 1
    proc = train(run_dir)
    result = summary(proc)
    assert "resuming" in proc.stderr
    assert_same_as(run_dir, ref, result)


def test_single_rank_run_resumed_on_two_ranks(interrupted: Path, ref: Path, tmp_path: Path) -> None:
    run_dir = copy_of(interrupted, tmp_path / "run")
    proc = train(run_dir, launcher=mpiexec(2))
    result = summary(proc)
    assert "resuming" in proc.stderr and "at iteration 3" in proc.stderr
    assert_same_as(run_dir, ref, result)
    assert ledger_arrays(run_dir)["world_size"].tolist() == [1, 1, 1, 2]


# ---- replay ----------------------------------------------------------------------------------------
def replay(run_dir: Path, out: Path, iteration: int | None = None) -> str:
    """`python -m hpc_es replay` in this process (the CLI itself runs in the damaged-log test)."""
    from hpc_es.cli import main

    args = ["replay", str(run_dir), "--out", str(out)] + ([] if iteration is None else ["--iteration", str(iteration)])
    assert main(args) == 0
    fp = fingerprint_of(out)
    return fp


def train_concurrently(*runs: tuple[Path, list[str]]) -> None:
    """Independent training runs side by side (one CPU thread each)."""
    import subprocess

    from conftest import PY, ROOT

    env = dict(os.environ, HPC_ES_FAULT="", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([PY, "-m", "hpc_es", *RUN, *extra, f"run_dir={run_dir}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for run_dir, extra in runs]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replay_last_and_intermediate_iteration(dtype: str, ref: Path, tmp_path: Path) -> None:
    extra = [f"dtype={dtype}"]
    full = ref if dtype == "float32" else tmp_path / "full"
    short = tmp_path / "short"  # the same config stopped after 2 iterations: the intermediate model
    runs = [(short, extra + ["es.iterations=2"])] + ([(full, extra)] if dtype != "float32" else [])
    train_concurrently(*runs)
    # the first iterations do not depend on es.iterations: same seeds, rewards, updates
    a, b = ledger_arrays(full), ledger_arrays(short)
    for key in ("seeds", "signs", "rewards", "shaped"):
        np.testing.assert_array_equal(a[key][:2], b[key], err_msg=key)
    assert replay(full, tmp_path / "last") == fingerprint_of(full / "final")
    assert replay(full, tmp_path / "mid", 2) == fingerprint_of(short / "final")
    import torch

    from hpc_es.models import load_model

    assert next(load_model(str(tmp_path / "mid")).parameters()).dtype == getattr(torch, dtype)


# ---- ledger-only checkpoints -----------------------------------------------------------------------
def test_ledger_only_checkpoint_resumes_by_replay(ref: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    opts = ["checkpoint.weights=false", "checkpoint.every=2"]
    proc = train(run_dir, opts, fault="after_ledger:2")
    assert proc.returncode == -9, proc.stderr
    assert sorted(os.listdir(run_dir / "checkpoint")) == ["log.h5", "state.json"]
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 2 and not state["has_weights"]
    proc = train(run_dir, opts)
    result = summary(proc)
    assert "from the base model + 3 ledger rows replayed" in proc.stderr
    assert_same_as(run_dir, ref, result)


# ---- refusals ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def altered_model(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with one weight changed: same architecture, another fingerprint."""
    import torch

    from hpc_es.models import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("altered") / "model"
    model = load_model(tiny_model_dir, torch.float32)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 0.5
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


def test_refuses_to_resume_or_replay_onto_another_base_model(interrupted: Path, altered_model: Path,
                                                              tmp_path: Path) -> None:
    run_dir = copy_of(interrupted, tmp_path / "run")
    before = sorted(os.listdir(run_dir))
    proc = train(run_dir, [f"model={altered_model}"])
    assert_clean_error(proc, "fingerprint", "refusing")
    assert sorted(os.listdir(run_dir)) == before
    proc = run_hpc_es(["replay", str(run_dir), "--out", str(tmp_path / "out"), "--model", str(altered_model)])
    assert_clean_error(proc, "fingerprint", "refusing")
    assert not (tmp_path / "out").exists()


def test_refuses_checkpoint_of_another_trajectory(interrupted: Path, tmp_path: Path) -> None:
    run_dir = copy_of(interrupted, tmp_path / "run")
    proc = train(run_dir, ["es.sigma=0.07"])
    assert_clean_error(proc, "es.sigma")
    # the checkpoint alone (log.h5 gone) is checked too
    os.remove(run_dir / "log.h5")
    proc = train(run_dir, ["seed=5"])
    assert_clean_error(proc, "seed")


# ---- damaged run directories -------------------------------------------------------------------------
def truncate(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    os.truncate(path, int(size * keep))


def test_truncated_log_recovers_from_checkpoint_copy(interrupted: Path, ref: Path, tmp_path: Path) -> None:
    run_dir = copy_of(interrupted, tmp_path / "run")
    truncate(run_dir / "log.h5")
    proc = run_hpc_es(["replay", str(run_dir), "--out", str(tmp_path / "r"), "--iteration", "2"])
    assert proc.returncode == 0 and "checkpoint's copy" in proc.stderr, proc.stderr
    proc = train(run_dir)
    result = summary(proc)
    assert "log.h5" in proc.stderr and "checkpoint's copy of the ledger" in proc.stderr
    assert (run_dir / "log.h5.damaged").is_file()
    assert_same_as(run_dir, ref, result)


def test_truncated_log_without_checkpoint_is_a_clear_error(interrupted: Path, tmp_path: Path) -> None:
    run_dir = copy_of(interrupted, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoint")  # as if killed before the first checkpoint
    truncate(run_dir / "log.h5")
    damaged = (run_dir / "log.h5").read_bytes()
    proc = train(run_dir)
    assert_clean_error(proc, "log.h5", "cannot resume")
    assert (run_dir / "log.h5").read_bytes() == damaged  # left as it was, not restarted from zero
    assert not (run_dir / "final").exists()


def test_corrupt_checkpoint_state_is_reported_and_rebuilt_from_ledger(interrupted: Path, ref: Path,
                                                                      tmp_path: Path) -> None:
    run_dir = copy_of(interrupted, tmp_path / "run")
    state = run_dir / "checkpoint" / "state.json"
    state.write_text(state.read_text()[:40])
    proc = train(run_dir)
    result = summary(proc)
    assert "state.json" in proc.stderr and "damaged" in proc.stderr
    assert "from the base model + 3 ledger rows replayed" in proc.stderr
    assert_same_as(run_dir, ref, result)


def test_corrupt_checkpoint_and_log_is_a_clear_error(interrupted: Path, tmp_path: Path) -> None:
    run_dir = copy_of(interrupted, tmp_path / "run")
    (run_dir / "checkpoint" / "state.json").write_text("{not json")
    truncate(run_dir / "log.h5", 0.3)
    proc = train(run_dir)
    assert_clean_error(proc, "cannot resume", "state.json")
    assert not (run_dir / "final").exists()


def test_corrupt_checkpoint_weights_fall_back_to_ledger(interrupted: Path, ref: Path, tmp_path: Path) -> None:
    run_dir = copy_of(interrupted, tmp_path / "run")
    weights = run_dir / "checkpoint" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit that still loads: caught by the recorded fingerprint
    weights.write_bytes(bytes(data))
    proc = train(run_dir)
    result = summary(proc)
    assert "fingerprint" in proc.stderr and "rebuilding the weights" in proc.stderr
    assert_same_as(run_dir, ref, result)


# ---- es.master_dtype=float32: the fp32 master survives kills, resumes and replay -------------------
FP32_MASTER = BF16 + ["es.master_dtype=float32"]


@pytest.fixture(scope="module")
def ref_fp32_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("durability") / "ref_fp32_master"
    summary(train(run_dir, FP32_MASTER))
    return run_dir


@pytest.mark.parametrize("fault, extra", [("update:2", []),
                                          ("after_ledger:2", ["checkpoint.weights=false", "checkpoint.every=2"])])
def test_fp32_master_kill_then_resume_is_bit_identical(fault: str, extra: list[str], ref_fp32_master: Path,
                                                       tmp_path: Path) -> None:
    """Checkpointed fp32 master weights, or the master rebuilt from the base model and the ledger: the
    resumed run ends with the uninterrupted run's final weights."""
    from safetensors import safe_open

    run_dir = tmp_path / "run"
    proc = train(run_dir, FP32_MASTER + extra, fault=fault)
    assert proc.returncode == -9, proc.stderr
    if not extra:
        with safe_open(str(run_dir / "checkpoint" / "model.safetensors"), "pt") as f:  # the master, in fp32
            assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}
    proc = train(run_dir, FP32_MASTER + extra)
    result = summary(proc)
    assert "resuming" in proc.stderr
    assert_same_as(run_dir, ref_fp32_master, result)


def test_fp32_master_final_is_bf16_and_replay_gives_its_fingerprint(ref_fp32_master: Path, tmp_path: Path) -> None:
    import torch

    from hpc_es.models import load_model

    assert next(load_model(str(ref_fp32_master / "final")).parameters()).dtype == torch.bfloat16
    assert replay(ref_fp32_master, tmp_path / "last") == fingerprint_of(ref_fp32_master / "final")
    state = json.loads((ref_fp32_master / "checkpoint" / "state.json").read_text())
    assert state["fingerprint"] != fingerprint_of(ref_fp32_master / "final")  # it covers the fp32 master
    # the fp32 master matters: the same ledger applied to a bf16 master ends elsewhere
    from hpc_es.es import Engine, Replica
    from hpc_es.ledger import Ledger
    from hpc_es.models import fingerprint

    ledger = Ledger.load(str(ref_fp32_master / "log.h5"))
    net = load_model(ledger.attrs["base_model"], torch.bfloat16)
    rep, eng = Replica.wrap(net, master_dtype="model"), Engine(json.loads(ledger.attrs["config"])["es"]["noise_chunk"])
    for row in ledger.rows:
        eng.update([rep], np.asarray(row["seeds"]), np.asarray(row["signs"]), np.asarray(row["shaped"]),
                   float(row["alpha"]))
    assert fingerprint(net) != fingerprint_of(ref_fp32_master / "final")


def test_resume_with_another_master_dtype_is_refused(ref_fp32_master: Path, tmp_path: Path) -> None:
    run_dir = copy_of(ref_fp32_master, tmp_path / "run")
    proc = train(run_dir, BF16 + ["es.iterations=5"])
    assert_clean_error(proc, "es.master_dtype")
