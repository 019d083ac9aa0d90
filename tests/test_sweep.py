"""``python -m hpc_es sweep``: the grid, α = σ/2, run_dir names; 2 seeds × 2 σ run locally and as a Slurm job
array on the real cluster of the test suite; ``report --pareto`` draws them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, ledger_arrays, run_hpc_es

from hpc_es.config import load_config
from hpc_es.errors import ConfigError
from hpc_es.sweep import grid, parse_seeds

# a sweep element: the tiny run of the other tests, 2 iterations, evaluated on 3 test items with the KL
SWEEP = [o for o in TINY if not o.startswith(("es.sigma", "es.alpha", "es.iterations"))] + [
    "es.iterations=2", "eval.every=2", "eval.limit=3", "task=conciseness"]


def test_grid_seeds_vary_fastest_alpha_follows_sigma_and_run_dirs_name_the_settings(tmp_path: Path) -> None:
    base = load_config(None, [f"run_dir={tmp_path}"])
    got = grid(base, [0, 1], ["es.sigma=5e-4,1e-3", "es.alpha=sigma/2", "es.population_size=6"])
    assert [(c.seed, c.es.sigma, c.es.alpha, c.es.population_size) for _, c in got] == [
        (0, 5e-4, 2.5e-4, 6), (1, 5e-4, 2.5e-4, 6), (0, 1e-3, 5e-4, 6), (1, 1e-3, 5e-4, 6)]
    assert [os.path.relpath(e.run_dir, tmp_path) for e, _ in got] == [
        "sigma_5e-4-seed_0", "sigma_5e-4-seed_1", "sigma_1e-3-seed_0", "sigma_1e-3-seed_1"]
    assert all(c.run_dir == e.run_dir for e, c in got)
    two = grid(base, [3], ["es.sigma=[0.01, 0.02]", "es.alpha=sigma*0.25", "es.shaping=rank,zscore"])
    assert [(c.es.sigma, c.es.alpha, c.es.shaping) for _, c in two] == [
        (0.01, 0.0025, "rank"), (0.01, 0.0025, "zscore"), (0.02, 0.005, "rank"), (0.02, 0.005, "zscore")]
    assert os.path.basename(two[1][0].run_dir) == "sigma_0.01-shaping_zscore-seed_3"


@pytest.mark.parametrize("seeds,settings,message", [
    ("0,x", [], "comma-separated list of integers"),
    ("1,1", [], "distinct"),
    ("0", ["seed=1,2"], "--seeds"),
    ("0", ["es.sigma=1e-3,-1"], "es.sigma"),
    ("0", ["es.sigmaa=1,2"], "did you mean es.sigma"),
    ("0", ["es.alpha=sigma/0"], "divides by zero"),
])
def test_bad_sweeps_are_refused_before_anything_runs(seeds: str, settings: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grid(load_config(), parse_seeds(seeds), settings)


def _check_runs(root: Path) -> list[Path]:
    runs = sorted(root.glob("sigma_*-seed_*"))
    assert [r.name for r in runs] == ["sigma_0.02-seed_0", "sigma_0.02-seed_1", "sigma_0.05-seed_0",
                                      "sigma_0.05-seed_1"]
    for run in runs:
        led = ledger_arrays(run)
        cfg = json.loads(led["attrs"]["config"])
        sigma, seed = float(run.name.split("-")[0].split("_")[1]), int(run.name.split("_")[-1])
        assert cfg["seed"] == seed and set(led["sigma"]) == {sigma} and set(led["alpha"]) == {sigma / 2}
        assert len(led["sigma"]) == 2 and np.isfinite(led["eval_kl_k3_per_completion"][-1])
        assert (run / "final" / "config.json").is_file()
    return runs


def _pareto(runs: list[Path], out: Path) -> str:
    proc = run_hpc_es(["report", *map(str, runs), "--pareto", f"--out={out}"], check=True)
    png = out / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return proc.stdout


@pytest.mark.integration
def test_local_sweep_runs_every_element_in_its_run_dir_and_report_pareto_draws_them(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    run_hpc_es(["sweep", "--seeds", "0,1", "--cluster", "local", *SWEEP, f"run_dir={root}",
                "es.sigma=0.02,0.05", "es.alpha=sigma/2"], check=True, timeout=900)
    runs = _check_runs(root)
    again = tmp_path / "single"  # a sweep element is the run that `python -m hpc_es` makes with its settings
    run_hpc_es([*SWEEP, "seed=1", "es.sigma=0.05", "es.alpha=0.025", f"run_dir={again}"], check=True)
    assert (ledger_arrays(again)["rewards"] == ledger_arrays(root / "sigma_0.05-seed_1")["rewards"]).all()
    table = _pareto(runs, tmp_path / "pareto")
    assert "sigma=0.02" in table and "sigma=0.05" in table and "2 seeds" in table


@pytest.mark.slurm
def test_slurm_sweep_is_one_job_array_and_report_pareto_draws_it(slurm_cluster, tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    with slurm_cluster.environ():
        proc = run_hpc_es(["sweep", "--seeds", "0,1", "--cluster", "slurm", "--cpus-per-task", "1", "--mem-gb", "2",
                           "--time", "10", *SWEEP, f"run_dir={root}", "es.sigma=0.02,0.05", "es.alpha=sigma/2"],
                          check=True, env={"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
        jobs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(jobs) == 4
        array = {j["job_id"].split("_")[0] for j in jobs}
        assert len(array) == 1 and sorted(j["job_id"].split("_")[1] for j in jobs) == ["0", "1", "2", "3"]
        for job in jobs:
            state = slurm_cluster.wait(job["job_id"], timeout=300)
            assert state == "COMPLETED", f"{job} ended {state}"
    runs = _check_runs(root)
    _pareto(runs, tmp_path / "pareto")
