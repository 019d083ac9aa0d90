"""``python -m hpc_es sweep``: a grid of runs (seeds × settings) as one Slurm job array, or one after another here.

    python -m hpc_es sweep --config C --seeds 0,1,2,3 es.sigma=5e-4,1e-3,1.5e-3 es.alpha=sigma/2

A ``key=v1,v2,...`` override (or ``key=[v1, v2]``) is an axis of the grid; a plain ``key=value`` applies to
every run.  ``es.alpha=sigma/K`` or ``sigma*K`` ties α to each run's σ (the paper's α = σ/2).  Each run gets
its own run_dir inside the config's ``run_dir``, named by its settings and seed (``sigma_1e-3-seed_0``), so a
requeued array element resumes its own run, as a single submitted run does (hpc_es.launch.TrainingJob).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from hpc_es.config import Config, expand_paths, parse_override, set_key, validate
from hpc_es.errors import ConfigError, HpcEsError

_TIED = re.compile(r"^\s*sigma\s*([*/])\s*([0-9.eE+-]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Element:
    """One run of the grid: its settings (``key=value`` texts, the seed last) and its run_dir."""

    overrides: tuple[str, ...]
    run_dir: str


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a comma-separated list of integers (e.g. --seeds 0,1,2,3)"
                          ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must list distinct integers (e.g. --seeds 0,1,2,3)")
    return seeds


def _axis(text: str) -> tuple[str, list[str]]:
    """``key=v1,v2`` or ``key=[v1, v2]`` -> (key, value texts); ``key=value`` -> (key, [value])."""
    key, raw = text.split("=", 1) if "=" in text else (text, "")
    key, raw = key.strip(), raw.strip()
    if not key or not raw:
        raise ConfigError(f"sweep setting '{text}' is not of the form key=value or key=v1,v2,...")
    if raw.startswith("[") and raw.endswith("]"):
        values = [v.strip() for v in raw[1:-1].split(",") if v.strip()]
    else:
        values = [v.strip() for v in raw.split(",")] if "," in raw else [raw]
    if not all(values):
        raise ConfigError(f"sweep setting '{text}' has an empty value")
    return key, values


def _label(key: str, value: str) -> str:
    return f"{key.rsplit('.', 1)[-1]}_{re.sub(r'[^A-Za-z0-9.+-]', '_', value)}"


def tied_alpha(cfg: Config, text: str) -> float | None:
    """``sigma/K`` or ``sigma*K`` evaluated at ``cfg.es.sigma``; None for a plain number."""
    m = _TIED.match(text)
    if not m:
        return None
    try:
        k = float(m.group(2))
    except ValueError:
        raise ConfigError(f"es.alpha={text!r}: '{m.group(2)}' is not a number") from None
    if m.group(1) == "/" and k == 0:
        raise ConfigError(f"es.alpha={text!r} divides by zero")
    return cfg.es.sigma / k if m.group(1) == "/" else cfg.es.sigma * k


def configure(base: Config, overrides: list[str]) -> tuple[Config, list[str]]:
    """``base`` with ``overrides`` applied, and the overrides with ``es.alpha=sigma/K`` replaced by its number
    (computed after everything else, so that it sees this run's σ)."""
    cfg = copy.deepcopy(base)
    tied = None
    for text in overrides:
        key, value = parse_override(text)
        if key == "es.alpha" and isinstance(value, str) and _TIED.match(value):
            tied = value
            continue
        set_key(cfg, key, value)
    if tied is None:
        return validate(expand_paths(cfg)), list(overrides)
    cfg.es.alpha = float(tied_alpha(cfg, tied))  # type: ignore[arg-type]
    plain = [o for o in overrides if parse_override(o)[0] != "es.alpha"]
    return validate(expand_paths(cfg)), plain + [f"es.alpha={cfg.es.alpha!r}"]


def grid(base: Config, seeds: list[int], settings: list[str]) -> list[tuple[Element, Config]]:
    """Every (settings, seed) combination, in order: the axes as given, the seed varying fastest."""
    fixed: list[str] = []
    axes: list[tuple[str, list[str]]] = []
    for text in settings:
        key, values = _axis(text)
        if key in ("seed", "run_dir"):
            raise ConfigError(f"sweep sets each run's '{key}' itself (--seeds; run_dir=DIR is the sweep's folder)")
        if len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        else:
            axes.append((key, values))
    root = os.path.abspath(base.run_dir)
    out: list[tuple[Element, Config]] = []
    for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in axes]):
        for seed in seeds:
            name = "-".join([_label(k, v) for k, v in combo] + [f"seed_{seed}"])
            run_dir = os.path.join(root, name)
            cfg, overrides = configure(base, fixed + [f"{k}={v}" for k, v in combo]
                                       + [f"seed={seed}", f"run_dir={run_dir}"])
            out.append((Element(tuple(overrides), run_dir), cfg))
    names = [e.run_dir for e, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError("two runs of the sweep would share a run_dir (repeated values?)")
    return out


def run_local(elements: list[tuple[Element, Config]], config_path: str | None) -> list[int]:
    """Each run as its own ``python -m hpc_es`` process, one after another; their exit codes."""
    codes = []
    for i, (element, _) in enumerate(elements):
        cmd = [sys.executable, "-m", "hpc_es"] + (["--config", config_path] if config_path else [])
        cmd += list(element.overrides)
        print(f"hpc_es: sweep {i + 1}/{len(elements)}: {os.path.basename(element.run_dir)}", file=sys.stderr,
              flush=True)
        codes.append(subprocess.run(cmd).returncode)
    return codes


def submit_array(elements: list[tuple[Element, Config]], root: str, **options: Any) -> list[Any]:
    """One job per element, submitted as one Slurm job array (submitit's ``batch``); the jobs in grid order."""
    from submitit.core.utils import FailedJobError

    from hpc_es.launch import TrainingJob, executor_parameters, make_executor, submit_failed

    options.setdefault("folder", os.path.join(root, "submitit"))
    folder, cluster, params = executor_parameters(elements[0][1], **options)
    executor = make_executor(folder, cluster, params)
    jobs: list[Any] = []
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; it is in the message
            with executor.batch():
                jobs = [executor.submit(TrainingJob(cfg.to_dict())) for _, cfg in elements]
    except (FailedJobError, OSError) as e:
        raise submit_failed(executor, e) from None
    return jobs


def main(argv: list[str]) -> int:
    from hpc_es.config import load_config
    from hpc_es.launch import add_executor_arguments, parse_command, result

    p = argparse.ArgumentParser(prog="python -m hpc_es sweep", allow_abbrev=False,
                                description="A grid of runs (seeds x settings): a Slurm job array, or local runs.")
    p.add_argument("--config", "-c", default=None, help="YAML config file")
    p.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 0,1,2,3")
    add_executor_arguments(p)
    p.add_argument("--wait", action="store_true", help="Slurm: wait for every job and print their results")
    p.add_argument("--dry-run", action="store_true", help="list the runs; submit nothing")
    args, rest, options = parse_command(p, argv)
    seeds = parse_seeds(args.seeds)
    folder = [r for r in rest if r.split("=", 1)[0].strip() == "run_dir"]  # the sweep's folder, not an axis
    base = load_config(args.config, folder)
    elements = grid(base, seeds, [r for r in rest if r not in folder])
    root = os.path.abspath(base.run_dir)
    if args.dry_run:
        for element, cfg in elements:
            print(json.dumps({"run_dir": element.run_dir, "seed": cfg.seed, "sigma": cfg.es.sigma,
                              "alpha": cfg.es.alpha, "overrides": list(element.overrides)}))
        return 0
    cluster = options.get("cluster") or ("slurm" if shutil.which("srun") else "local")  # submitit's rule
    if cluster in ("local", "debug"):
        codes = run_local(elements, args.config)
        failed = [os.path.basename(e.run_dir) for (e, _), c in zip(elements, codes) if c != 0]
        if failed:
            raise HpcEsError(f"{len(failed)} of {len(elements)} runs failed: {', '.join(failed)}")
        print(json.dumps({"runs": [e.run_dir for e, _ in elements]}), flush=True)
        return 0
    jobs = submit_array(elements, root, **options)
    for (element, _), job in zip(elements, jobs):
        print(json.dumps({"job_id": job.job_id, "run_dir": element.run_dir}), flush=True)
    if args.wait:
        for job in jobs:
            print(json.dumps(result(job)), flush=True)
    return 0

