"""The single-process trainer end to end: ledger contents, determinism, golden trace, the default job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, check_golden, fingerprint_of, ledger_arrays, run_hpc_es
from hpc_es.config import load_config
from hpc_es.es import zscore
from hpc_es.seeds import member_seeds
from hpc_es.trainer import iteration_examples

GOLDEN = Path(__file__).parent / "golden" / "tiny_trace.json"
GOLDEN_LEGACY = Path(__file__).parent / "golden" / "tiny_trace_legacy.json"  # written before the keyed scheme


@pytest.mark.integration
def test_ledger_datasets_shapes_and_contents(reference_run: Path) -> None:
    led = ledger_arrays(reference_run)
    cfg = load_config(None, TINY + [f"run_dir={reference_run}"])
    T, N = cfg.es.iterations, cfg.es.population_size
    assert led["seeds"].dtype == np.int64 and led["seeds"].shape == (T, N)
    assert led["rewards"].dtype == np.float64 and led["rewards"].shape == (T, N)
    assert led["shaped"].shape == (T, N) and led["signs"].shape == (T, N)
    for t in range(T):
        assert np.array_equal(led["seeds"][t], member_seeds(cfg.seed, t, N)[0])
        assert np.array_equal(led["shaped"][t], zscore(led["rewards"][t]))
    assert led["iteration"].tolist() == list(range(T))
    np.testing.assert_array_equal(led["reward_mean"], led["rewards"].mean(axis=1))
    np.testing.assert_array_equal(led["reward_max"], led["rewards"].max(axis=1))
    np.testing.assert_array_equal(led["reward_min"], led["rewards"].min(axis=1))
    assert (led["sigma"] == cfg.es.sigma).all() and (led["alpha"] == cfg.es.alpha).all()
    for k in ("time_perturb", "time_rollout", "time_reward", "time_update"):
        assert led[k].shape == (T,) and (led[k] >= 0).all() and led[k].sum() > 0
    # no eval.every: the test-split columns exist and say "not evaluated"
    assert np.isnan(led["eval_reward"]).all() and np.isnan(led["eval_accuracy"]).all()
    assert (led["time_eval"] == 0).all()
    assert json.loads(led["attrs"]["config"]) == json.loads(cfg.to_json())
    assert led["attrs"]["base_fingerprint"] == fingerprint_of(led["attrs"]["base_model"])
    assert (reference_run / "final" / "model.safetensors").is_file()
    assert (reference_run / "final" / "tokenizer.json").is_file()


@pytest.mark.integration
def test_same_config_same_fingerprint_and_rewards(reference_run: Path, tmp_path: Path) -> None:
    proc = run_hpc_es(TINY + [f"run_dir={tmp_path / 'again'}"], check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["fingerprint"] == fingerprint_of(reference_run / "final") == fingerprint_of(tmp_path / "again/final")
    assert np.array_equal(ledger_arrays(reference_run)["rewards"], ledger_arrays(tmp_path / "again")["rewards"])


@pytest.mark.integration
def test_training_changes_the_weights_and_fingerprint_cli_prints_one_line(reference_run: Path,
                                                                          tiny_model_dir: str) -> None:
    proc = run_hpc_es(["fingerprint", str(reference_run / "final")], check=True)
    line = proc.stdout.strip()
    assert len(line) == 64 and "\n" not in line and int(line, 16) >= 0
    assert line == fingerprint_of(reference_run / "final") != fingerprint_of(tiny_model_dir)


@pytest.mark.integration
def test_periodic_test_evaluation_matches_eval_of_the_replayed_weights(reference_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    split = ["data.test_size=5", "rollout.batch_size=2"]
    run_hpc_es(TINY + split + ["eval.every=2", f"run_dir={run_dir}"], check=True)
    led, ref = ledger_arrays(run_dir), ledger_arrays(reference_run)
    # evaluating changes no weight, reward or seed
    assert fingerprint_of(run_dir / "final") == fingerprint_of(reference_run / "final")
    for key in ("seeds", "rewards", "shaped"):
        np.testing.assert_array_equal(led[key], ref[key])
    tested = ~np.isnan(led["eval_reward"])
    assert tested.tolist() == [False, True, True]  # after iteration 2 (every 2) and after the last (3)
    assert (led["time_eval"][tested] > 0).all() and (led["time_eval"][~tested] == 0).all()
    assert np.isnan(led["eval_accuracy"]).all()  # conciseness has no notion of a correct answer
    for t in np.flatnonzero(tested):
        out = tmp_path / f"after{t + 1}"
        run_hpc_es(["replay", str(run_dir), "--iteration", str(t + 1), "--out", str(out)], check=True)
        proc = run_hpc_es(["eval"] + TINY + split + [f"model={out}"], check=True)
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        assert report["examples"] == 5 and report["mean_reward"] == led["eval_reward"][t]


@pytest.mark.integration
def test_eval_every_without_a_test_split_is_a_clear_error(tmp_path: Path) -> None:
    task = tmp_path / "train_only.py"
    task.write_text("from hpc_es.tasks import Example\n\n\nclass TrainOnly:\n    name = 'train_only'\n\n"
                    "    def train_examples(self):\n        return [Example('a', {})]\n\n"
                    "    def test_examples(self):\n        return []\n\n"
                    "    def score(self, completion, example):\n        return 0.0\n\n\ntask = TrainOnly()\n")
    proc = run_hpc_es(TINY + ["eval.every=1", f"task={task}:task", f"run_dir={tmp_path / 'run'}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"hpc_es: error: eval.every=1 but task '{task}:task' has no "
                                                    "test examples (see data.train_size, data.test_size)")
    assert not (tmp_path / "run" / "log.h5").exists()


@pytest.mark.integration
def test_golden_trace(reference_run: Path) -> None:
    """Rewards and final fingerprint of the TINY run, checked in (regenerate: HPC_ES_UPDATE_GOLDEN=1)."""
    led = ledger_arrays(reference_run)
    trace = {"overrides": TINY, "rewards": led["rewards"].tolist(),
             "fingerprint": fingerprint_of(reference_run / "final")}
    check_golden(GOLDEN.name, json.dumps(trace, indent=1) + "\n", GOLDEN.parent)
    want = json.loads(GOLDEN.read_text())
    assert want["overrides"] == TINY, "TINY changed: regenerate the golden trace"
    assert trace["rewards"] == want["rewards"]
    assert trace["fingerprint"] == want["fingerprint"]


@pytest.mark.integration
def test_legacy_noise_scheme_reproduces_the_old_golden_trace_and_replays(tmp_path: Path) -> None:
    """A run made before the keyed scheme (its ledger has no noise_scheme): same rewards, same weights."""
    import h5py

    run_dir = tmp_path / "legacy"
    run_hpc_es(TINY + ["es.noise_scheme=legacy", f"run_dir={run_dir}"], check=True)
    led = ledger_arrays(run_dir)
    assert led["attrs"]["noise_scheme"] == "legacy"
    want = json.loads(GOLDEN_LEGACY.read_text())
    assert want["overrides"] == TINY
    assert led["rewards"].tolist() == want["rewards"]
    assert fingerprint_of(run_dir / "final") == want["fingerprint"]
    # make the ledger look like one from before the keyed scheme, then rebuild the weights from it
    with h5py.File(run_dir / "log.h5", "r+") as f:
        del f.attrs["noise_scheme"]
        cfg = json.loads(f.attrs["config"])
        del cfg["es"]["noise_scheme"]
        f.attrs["config"] = json.dumps(cfg, sort_keys=True)
    run_hpc_es(["replay", str(run_dir), "--out", str(tmp_path / "replayed")], check=True)
    assert fingerprint_of(tmp_path / "replayed") == want["fingerprint"]
    # continuing it under the default (keyed) scheme would change its noise: refused, saying why
    proc = run_hpc_es(TINY + ["es.iterations=4", f"run_dir={run_dir}"])
    assert proc.returncode != 0
    assert "a run with different es.noise_scheme" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_keyed_runs_replay_on_another_device_type_legacy_runs_do_not(reference_run: Path, tmp_path: Path) -> None:
    """Keyed noise has the same bits on CPU and CUDA: a run recorded as drawn on CUDA replays on the CPU."""
    import shutil

    import h5py

    run_dir = tmp_path / "from_gpu"
    shutil.copytree(reference_run, run_dir)
    with h5py.File(run_dir / "log.h5", "r+") as f:
        assert f.attrs["noise_scheme"] == "keyed"
        f.attrs["noise_device"] = "cuda"
    run_hpc_es(["replay", str(run_dir), "--out", str(tmp_path / "replayed")], check=True)
    assert fingerprint_of(tmp_path / "replayed") == fingerprint_of(reference_run / "final")
    with h5py.File(run_dir / "log.h5", "r+") as f:
        f.attrs["noise_scheme"] = "legacy"
    proc = run_hpc_es(["replay", str(run_dir), "--out", str(tmp_path / "refused")])
    assert proc.returncode != 0
    assert "drew its noise on cuda but this process is on cpu; replay with --device cuda" in proc.stderr


@pytest.mark.integration
def test_noise_chunk_changes_no_result_under_the_keyed_scheme(reference_run: Path, tmp_path: Path) -> None:
    run_hpc_es(TINY + ["es.noise_chunk=1024", f"run_dir={tmp_path / 'small'}"], check=True)
    assert fingerprint_of(tmp_path / "small" / "final") == fingerprint_of(reference_run / "final")
    np.testing.assert_array_equal(ledger_arrays(tmp_path / "small")["rewards"], ledger_arrays(reference_run)["rewards"])


def test_iteration_prompts_are_a_pure_function_of_seed_and_iteration() -> None:
    items = list(range(10))
    assert iteration_examples(items, 5, 10, 0) == items  # all of them when they fit
    a = [iteration_examples(items, t, 4, 1) for t in range(5)]
    assert a == [iteration_examples(items, t, 4, 1) for t in range(5)]
    flat = sum(a[:2], []) + a[2][:2]  # the first epoch (10 items) is a permutation
    assert sorted(flat) == items


@pytest.mark.integration
def test_the_default_job_learns(tmp_path: Path) -> None:
    """`python -m hpc_es` with no settings but run_dir: the conciseness reward must clearly improve."""
    proc = run_hpc_es([f"run_dir={tmp_path / 'demo'}", "progress=false"], check=True, timeout=600)
    mean = ledger_arrays(tmp_path / "demo")["reward_mean"]
    assert len(mean) == load_config(None, []).es.iterations
    first, last = mean[:10].mean(), mean[-10:].mean()
    assert last > first + 5.0, (first, last)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["reward_mean_last"] == pytest.approx(mean[-1])


@pytest.mark.parametrize("master_dtype", ["model", "float32"])
def test_two_replicas_per_device_share_one_master_and_match_one_replica(tmp_path: Path, master_dtype: str) -> None:
    """dist.replicas_per_device=2 on the CPU: one master for both (the same tensors), and the same final
    weights (and fp32 master) as one replica."""
    from hpc_es.comm import Comm
    from hpc_es.trainer import Trainer

    results = {}
    for copies in (1, 2):
        cfg = load_config(None, TINY + ["dtype=bfloat16", f"es.master_dtype={master_dtype}",
                                        f"dist.replicas_per_device={copies}", f"run_dir={tmp_path / str(copies)}"])
        trainer = Trainer(cfg, Comm())
        reps = trainer.population.replicas
        assert len(reps) == copies
        if copies == 2:
            assert reps[1].master is reps[0].master
            assert all(reps[1].master[n] is t for n, t in reps[0].master.items())
            assert all(p.data_ptr() != q.data_ptr() for (_, p), (_, q) in zip(reps[0].params, reps[1].params))
        want = {"model": "bfloat16", "float32": "float32"}[master_dtype]
        assert {str(t.dtype) for t in reps[0].master.values()} == {f"torch.{want}"}
        res = trainer.run()
        results[copies] = (res.fingerprint, reps[0].master_fingerprint(), ledger_arrays(cfg.run_dir)["rewards"])
        assert reps[-1].digest() == reps[0].digest()
    assert results[1][:2] == results[2][:2]
    np.testing.assert_array_equal(results[1][2], results[2][2])
