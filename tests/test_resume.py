"""The resume planner in-process, on run_dirs built by hand: what it decides, what it refuses, and that it
only reads.  ``apply`` against a fake population: which weights it loads and which rows it replays."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_es import checkpoint as ckpt
from hpc_es import resume
from hpc_es.config import Config, load_config
from hpc_es.ledger import SCALARS, Ledger
from hpc_es.seeds import member_seeds

N = 4
BASE_FP = "ab" * 32


def config(run_dir: Path, *overrides: str) -> Config:
    return load_config(None, [f"run_dir={run_dir}", f"es.population_size={N}", "es.iterations=10", *overrides])


def row(t: int) -> dict:
    """Iteration t's row as the run writes it: its seed table, the config's sigma and alpha (resume checks them)."""
    rng, es = np.random.default_rng(t), Config().es
    seeds, signs = member_seeds(Config().seed, t, N, es.antithetic)
    r = {"iteration": t, "seeds": seeds, "signs": signs, "rewards": rng.normal(size=N), "shaped": rng.normal(size=N),
         "sigma": es.sigma, "alpha": es.alpha}
    for key in SCALARS:
        r.setdefault(key, 0.5 if SCALARS[key] == np.float64 else 1)
    return r


def ledger(cfg: Config, n: int, base_fp: str = BASE_FP, noise_device: str = "cpu") -> Ledger:
    led = Ledger(N, {"config": cfg.to_json(), "base_fingerprint": base_fp, "base_model": "/m",
                     "noise_device": noise_device})
    for t in range(n):
        led.append(row(t))
    return led


def checkpoint(cfg: Config, done: int, with_weights: bool = True, fp: str = "f" * 64, copy: int | None = None) -> None:
    """A checkpoint after ``done`` iterations with a ledger copy of ``copy`` rows (default ``done``)."""
    state = ckpt.CheckpointState(iteration=done, base_model="/m", base_fingerprint=BASE_FP, fingerprint=fp,
                                 has_weights=with_weights, config=cfg.to_json())
    weights = {"w": torch.full((3,), float(done))} if with_weights else None
    ckpt.save(cfg.run_dir, state, weights, ledger=ledger(cfg, done if copy is None else copy))


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under run_dir with a hash of its bytes: the planner must leave them all alone."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def plan(cfg: Config, device: str = "cpu") -> resume.ResumePlan | None:
    before = snapshot(Path(cfg.run_dir))
    try:
        return resume.plan(cfg, BASE_FP, "/m", device)
    finally:
        assert snapshot(Path(cfg.run_dir)) == before, "plan() changed run_dir"


def test_an_empty_run_dir_is_a_fresh_run(tmp_path: Path) -> None:
    assert plan(config(tmp_path)) is None


def test_a_ledger_alone_is_replayed_from_the_base_model(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    ledger(cfg, 3).save(str(tmp_path / "log.h5"))
    p = plan(cfg)
    assert p is not None and (p.start, p.done, p.checkpoint, p.notes) == (3, 0, None, [])
    assert [r["iteration"] for r in p.rows] == [0, 1, 2]


def test_a_ledger_longer_than_the_checkpoint_replays_the_rows_after_it(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    checkpoint(cfg, 3)
    ledger(cfg, 5).save(str(tmp_path / "log.h5"))
    p = plan(cfg)
    assert p is not None and (p.start, p.done, p.fingerprint) == (5, 3, "f" * 64)
    assert p.checkpoint == os.path.join(str(tmp_path), "checkpoint") and not p.keep_damaged


def test_a_ledger_shorter_than_the_checkpoint_uses_the_checkpoint_copy(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    checkpoint(cfg, 3)
    ledger(cfg, 1).save(str(tmp_path / "log.h5"))
    p = plan(cfg)
    assert p is not None and (p.start, p.done, p.keep_damaged) == (3, 3, True)
    assert "log.h5 holds 1 iterations but the checkpoint is at 3" in p.notes[0]


def test_a_truncated_ledger_falls_back_to_the_checkpoint_copy(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    checkpoint(cfg, 2)
    ledger(cfg, 4).save(str(tmp_path / "log.h5"))
    data = (tmp_path / "log.h5").read_bytes()
    (tmp_path / "log.h5").write_bytes(data[: len(data) // 2])
    p = plan(cfg)
    assert p is not None and (p.start, p.done, p.keep_damaged) == (2, 2, True)
    assert "checkpoint's copy of the ledger" in p.notes[0] and "log.h5.damaged" in p.notes[0]


def test_a_truncated_ledger_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    ledger(cfg, 4).save(str(tmp_path / "log.h5"))
    data = (tmp_path / "log.h5").read_bytes()
    (tmp_path / "log.h5").write_bytes(data[:100])
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint to recover from; nothing was changed"):
        plan(cfg)


def test_a_checkpoint_copy_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    checkpoint(cfg, 3, copy=2)
    with pytest.raises(ckpt.CheckpointError, match="holds 2 iterations, not 3"):
        plan(cfg)


def test_a_foreign_ledger_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    ledger(cfg, 2, base_fp="cd" * 32).save(str(tmp_path / "log.h5"))
    with pytest.raises(ckpt.CheckpointError, match="refusing to resume onto a different model"):
        plan(cfg)


def test_a_ledger_of_another_trajectory_is_refused_naming_the_keys(tmp_path: Path) -> None:
    ledger(config(tmp_path, "es.sigma=0.5", "seed=9"), 2).save(str(tmp_path / "log.h5"))
    with pytest.raises(ckpt.CheckpointError, match="different seed, es.sigma"):
        plan(config(tmp_path))


def test_a_checkpoint_of_another_trajectory_is_refused(tmp_path: Path) -> None:
    checkpoint(config(tmp_path, "es.alpha=0.5"), 2)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint .* different es.alpha"):
        plan(config(tmp_path))


def test_a_damaged_checkpoint_rebuilds_from_the_base_model_and_the_ledger(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    checkpoint(cfg, 2)
    ledger(cfg, 3).save(str(tmp_path / "log.h5"))
    (tmp_path / "checkpoint" / "state.json").write_text("{not json")
    p = plan(cfg)
    assert p is not None and (p.start, p.done, p.checkpoint) == (3, 0, None)
    assert "damaged" in p.notes[0] and "rebuilding the weights from the base model" in p.notes[0]


def test_more_iterations_than_configured_are_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    ledger(cfg, 3).save(str(tmp_path / "log.h5"))
    with pytest.raises(ckpt.CheckpointError, match="more than es.iterations=2"):
        plan(config(tmp_path, "es.iterations=2"))


def test_noise_from_another_device_type_is_refused_when_rows_must_be_replayed(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    ledger(cfg, 2, noise_device="cuda").save(str(tmp_path / "log.h5"))
    with pytest.raises(ckpt.CheckpointError, match="drew its noise on cuda but this process is on cpu"):
        plan(cfg)


class FakePopulation:
    """Weights are one number per update: the fingerprint is the list of what was applied."""

    def __init__(self) -> None:
        self.loaded: list[float] = []
        self.updates: list[float] = []

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.loaded.append(float(weights["w"][0]))
        self.updates = []

    def fingerprint(self) -> str:
        return "f" * 64 if self.loaded and self.loaded[-1] >= 0 else "base+" + ",".join(map(str, self.updates))

    def update(self, seeds: np.ndarray, signs: np.ndarray, shaped: np.ndarray, alpha: float) -> None:
        self.updates.append(float(shaped[0]))


def test_apply_loads_the_checkpoint_then_replays_only_the_later_rows(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    checkpoint(cfg, 3)
    ledger(cfg, 5).save(str(tmp_path / "log.h5"))
    p = plan(cfg)
    assert p is not None
    pop = FakePopulation()
    resume.apply(p, pop, lambda: {"w": torch.full((3,), -1.0)}, cfg.run_dir, "cpu")
    assert p.from_weights and pop.loaded == [3.0]
    assert pop.updates == [float(r["shaped"][0]) for r in p.rows[3:]]


def test_apply_falls_back_to_the_base_model_when_checkpoint_weights_do_not_match(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    checkpoint(cfg, 2, fp="0" * 64)  # recorded fingerprint that the loaded weights will not have
    ledger(cfg, 2).save(str(tmp_path / "log.h5"))
    p = plan(cfg)
    assert p is not None
    pop = FakePopulation()
    with pytest.raises(ckpt.CheckpointError, match="the ledger and the checkpoint disagree"):
        resume.apply(p, pop, lambda: {"w": torch.full((3,), -1.0)}, cfg.run_dir, "cpu")
    assert pop.loaded == [2.0, -1.0] and not p.from_weights
    assert "have fingerprint" in p.notes[0] and "rebuilding the weights" in p.notes[0]
    assert pop.updates == [float(r["shaped"][0]) for r in p.rows[:2]]


def test_read_ledger_falls_back_to_the_checkpoint_copy_with_a_note(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    checkpoint(cfg, 2)
    (tmp_path / "log.h5").write_bytes(b"not hdf5")
    led, note = resume.read_ledger(str(tmp_path))
    assert len(led) == 2 and note is not None and "checkpoint's copy of the ledger (2 iterations)" in note
