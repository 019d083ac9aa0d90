"""hpc_es.launch without a cluster: the sbatch script a submission produces (golden file), bad executor
options, and the local/debug fallbacks running a real tiny training."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import TINY, check_golden, fingerprint_of, run_hpc_es

from hpc_es import launch
from hpc_es.config import load_config
from hpc_es.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"

# A 2-node, 4-GPU-per-node submission of the 7B config, with every kind of option.
OPTIONS = {"nodes": 2, "gpus_per_node": 4, "cpus_per_task": 8, "mem_gb": 200, "partition": "gpu",
           "time": 720, "job_name": "es-countdown", "slurm_account": "proj", "folder": "/logs/%j"}
OVERRIDES = {"model": "/models/Qwen2.5-7B-Instruct", "data.path": "/data/countdown.json",
             "run_dir": "/runs/countdown", "es.sigma": 0.002}


def _golden(name: str, text: str) -> None:
    check_golden(name, text, GOLDEN)


def _portable(text: str) -> str:
    return text.replace(sys.executable, "PYTHON")


def test_submission_parameters_golden():
    cfg = launch.resolve_config(ROOT / "configs" / "countdown_qwen2.5-7b.yaml", OVERRIDES)
    folder, cluster, params = launch.executor_parameters(cfg, **OPTIONS)
    assert (folder, cluster) == ("/logs/%j", None)
    assert cfg.es.sigma == 0.002 and cfg.run_dir == "/runs/countdown"
    _golden("submit_params.json", json.dumps(params, indent=2, sort_keys=True) + "\n")


def test_sbatch_script_golden():
    script = launch.sbatch_script(ROOT / "configs" / "countdown_qwen2.5-7b.yaml", overrides=OVERRIDES, **OPTIONS)
    assert "#SBATCH --ntasks-per-node=4" in script and "--mpi=pmix" in script  # one rank per GPU, PMIx
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR2@180" in script
    _golden("submit_params.sh", _portable(script))


@pytest.mark.integration
def test_cli_dry_run_prints_the_same_script():
    args = ["submit", "--config", "configs/countdown_qwen2.5-7b.yaml", "--dry-run", "--nodes", "2",
            "--gpus-per-node", "4", "--cpus-per-task", "8", "--mem-gb", "200", "--partition", "gpu",
            "--time", "720", "--job-name", "es-countdown", "--folder", "/logs/%j"]
    args += [f"{k}={v}" for k, v in OVERRIDES.items()]
    proc = run_hpc_es(args, check=True)
    expected = (GOLDEN / "submit_params.sh").read_text().replace("#SBATCH --account=proj\n", "")
    assert _portable(proc.stdout) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"gpus": 2}, "unknown executor option 'gpus'"),
    ({"nodse": 2}, "did you mean nodes"),
    ({"es__sigma": 0.1}, "overrides={'es.sigma': ...}"),
    ({"cluster": "pbs"}, "choose one of slurm, local, debug"),
    ({"nodes": 0}, "nodes=0 must be an integer >= 1"),
    ({"time": "1h"}, "time='1h' must be an integer"),
    ({"cluster": "local", "tasks_per_node": 2}, "runs a single rank"),
    ({"overrides": {"es.sigmaa": 1}}, "unknown config key 'es.sigmaa'"),
    ({"overrides": 3}, "overrides must be a mapping"),
])
def test_bad_input_fails_before_submitting(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=None) as err:
        launch.submit(ROOT / "configs" / "tiny_mpi.yaml", folder=str(tmp_path / "logs"), **kwargs)
    assert message in str(err.value)
    assert not (tmp_path / "logs").exists()


@pytest.mark.integration
def test_cli_unknown_option_is_an_error():
    proc = run_hpc_es(["submit", "--config", "configs/tiny_mpi.yaml", "--gpus", "2"])
    assert proc.returncode != 0
    assert "hpc_es: error: unknown option --gpus for submit" in proc.stderr


def test_config_keywords_join_the_overrides_and_the_rest_are_executor_options():
    items, options = launch.split_keywords(["es.sigma=0.5"], {"run_dir": "r", "es": {"alpha": 0.25}, "nodes": 2,
                                                              "progress": False})
    assert items == ["es.sigma=0.5", 'run_dir="r"', "es.alpha=0.25", "progress=false"]
    assert options == {"nodes": 2}
    cfg = launch.resolve_config(None, items)
    assert (cfg.es.sigma, cfg.es.alpha, cfg.progress) == (0.5, 0.25, False) and cfg.run_dir.endswith("/r")
    with pytest.raises(ConfigError, match="config section 'es' takes a mapping"):
        launch.split_keywords(None, {"es": 0.5})
    with pytest.raises(ConfigError, match="unknown config key 'es.sigmaa'"):
        launch.sbatch_script(None, es={"sigmaa": 0.5})


def test_config_object_is_not_modified():
    cfg = load_config(str(ROOT / "configs" / "tiny_mpi.yaml"))
    out = launch.resolve_config(cfg, ["es.sigma=0.5", "run_dir=rel/run"])
    assert out.es.sigma == 0.5 and os.path.isabs(out.run_dir)
    assert cfg.es.sigma == 0.05 and cfg.run_dir == "runs/tiny_mpi"


@pytest.mark.integration
@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_local_fallback_trains_like_a_direct_run(tmp_path, reference_run, cluster):
    overrides = dict(launch.parse_override(o) for o in TINY)
    overrides["run_dir"] = str(tmp_path / "run")
    if cluster == "local":
        job = launch.submit(None, overrides=overrides, cluster=cluster, time=10)
    else:  # config settings as keyword arguments: top-level keys, and sections as mappings
        sections: dict[str, dict] = {}
        top = {}
        for key, value in overrides.items():
            if "." in key:
                section, name = key.split(".", 1)
                sections.setdefault(section, {})[name] = value
            else:
                top[key] = value
        job = launch.submit(None, **top, **sections, cluster=cluster, time=10)
    result = launch.result(job)
    assert result["final_dir"] == str(tmp_path / "run" / "final")
    assert result["world_size"] == 1 and result["iterations"] == 3
    assert result["fingerprint"] == fingerprint_of(result["final_dir"]) == fingerprint_of(reference_run / "final")
