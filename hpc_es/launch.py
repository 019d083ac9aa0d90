"""Submit a distributed training run with submitit: Slurm, or a local process as a fallback.

From Python::

    import hpc_es
    job = hpc_es.submit("configs/countdown_qwen2.5-7b.yaml", nodes=2, gpus_per_node=8, time=24 * 60,
                        partition="gpu", overrides={"es.sigma": 0.002, "run_dir": "/scratch/me/run1"})
    print(job.job_id)
    result = hpc_es.result(job)          # {"final_dir": ..., "fingerprint": ..., "run_dir": ..., ...}

(``result(job)`` is ``job.results()[0]``, rank 0's answer: submitit's ``job.result()`` refuses a job of
several tasks.)

Two kinds of keyword arguments, kept apart:

* executor options, named keyword arguments (see :data:`EXECUTOR_OPTIONS`): where and how the job runs.
  Any submitit Slurm parameter can be added with its ``slurm_`` name (``slurm_account="proj"``,
  ``slurm_qos="high"``, ``slurm_additional_parameters={...}``).  An unknown option is an error.
* config settings, in ``overrides=``: a mapping of dotted keys (``{"es.sigma": 0.002}``) or a list of
  ``"key=value"`` strings, applied on top of ``config`` (a YAML path, a :class:`~hpc_es.config.Config`
  or None for the defaults) and checked here, before anything is submitted.  Config settings may also
  be keyword arguments named after a top-level key or a section, which take a mapping:
  ``submit(cfg, run_dir="/scratch/me/run1", es={"sigma": 0.002}, nodes=2)``.

The job runs one rank per task (``tasks_per_node``, default ``gpus_per_node`` or 1) under
``srun --mpi=pmix`` (``mpi="pmi2"`` for MPICH).  On a time limit or preemption submitit sends SIGUSR2;
the job then requeues itself and resumes from ``run_dir`` (the ledger and checkpoints in it), losing at
most the iteration in flight.  ``cluster="local"`` or ``"debug"`` run a single rank on this machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import os
import sys
from typing import Any, Mapping, Sequence

from hpc_es.config import Config, all_keys, expand_paths, load_config, parse_override, set_key, validate
from hpc_es.errors import ConfigError, HpcEsError

#: Executor options of :func:`submit` and their defaults.
EXECUTOR_OPTIONS: dict[str, Any] = {
    "nodes": 1,
    "gpus_per_node": 0,
    "tasks_per_node": None,  # None: gpus_per_node, or 1 without GPUs (one rank per task)
    "cpus_per_task": None,
    "mem_gb": None,
    "partition": None,
    "time": 60,  # minutes
    "folder": None,  # submitit's logs and pickles; None: <run_dir>/submitit
    "cluster": None,  # slurm | local | debug; None: slurm where srun is on PATH (submitit's rule), else local
    "job_name": "hpc_es",
    "mpi": "pmix",  # srun --mpi plugin: pmix (Open MPI) | pmi2 (MPICH) | none
    "signal_delay_s": 180,  # SIGUSR2 this long before the time limit: checkpoint and requeue
    "max_requeues": 10,  # timeouts after which the job is not requeued again
}
CLUSTERS = ("slurm", "local", "debug")


class TrainingJob:
    """The function submitit runs in every task: one rank of ``hpc_es`` training.

    Checkpointable (it has ``checkpoint``): on SIGUSR2 submitit asks it for the submission to requeue,
    which is simply itself, since a run resumes from ``run_dir`` by itself.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def __call__(self) -> dict[str, Any]:
        from hpc_es.comm import make_comm
        from hpc_es.config import config_from_dict
        from hpc_es.runner import quiet_libraries, run_training

        quiet_libraries()
        cfg = config_from_dict(self.config)
        comm = make_comm(cfg.dist.backend, cfg.dist.timeout_s)
        # No signal handlers of ours: submitit's (SIGUSR2 -> checkpoint() and requeue) stay in place.
        return run_training(cfg, comm, own_process=False)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def resolve_config(config: str | os.PathLike[str] | Config | None,
                   overrides: Mapping[str, Any] | Sequence[str] | None = None) -> Config:
    """The checked Config the job will run: ``config`` plus ``overrides``, with an absolute run_dir."""
    items = split_keywords(overrides, {})[0]
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
        for item in items:
            set_key(cfg, *parse_override(item))
        cfg = validate(expand_paths(cfg))
    elif config is None or isinstance(config, (str, os.PathLike)):
        # Overrides go through load_config so that they apply before $VAR expansion.
        cfg = load_config(os.fspath(config) if config is not None else None, items)
    else:
        raise ConfigError(f"config must be a YAML path or a hpc_es.config.Config, got {type(config).__name__}")
    cfg.run_dir = os.path.abspath(cfg.run_dir)  # the job may start in another folder
    if cfg.model != "tiny":
        cfg.model = os.path.abspath(cfg.model)
    return cfg


_CONFIG_NAMES = frozenset(f.name for f in dataclasses.fields(Config))


def split_keywords(overrides: Mapping[str, Any] | Sequence[str] | None,
                   options: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Keyword arguments named after config keys or sections join ``overrides`` (as ``key=value``
    strings, after them); the rest are executor options."""
    if overrides is None:
        items: list[str] = []
    elif isinstance(overrides, Mapping):
        items = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    elif isinstance(overrides, (list, tuple)):
        items = [str(o) for o in overrides]
    else:
        raise ConfigError("overrides must be a mapping of dotted keys ({'es.sigma': 0.01}) or a list of "
                          "'key=value' strings")
    executor: dict[str, Any] = {}
    for name, value in options.items():
        if name not in _CONFIG_NAMES:
            executor[name] = value
        elif isinstance(getattr(Config(), name), (int, float, str, bool)):
            items.append(f"{name}={json.dumps(value)}")
        elif isinstance(value, Mapping):
            items.extend(f"{name}.{k}={json.dumps(v)}" for k, v in value.items())
        else:
            raise ConfigError(f"config section '{name}' takes a mapping of its keys, e.g. {name}={{...}}; "
                              f"got {type(value).__name__}")
    return items, executor


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = [k for k in options if k not in EXECUTOR_OPTIONS and not k.startswith("slurm_")]
    if unknown:
        key = unknown[0]
        dotted = key.replace("__", ".")
        if dotted in all_keys():
            raise ConfigError(f"'{key}' is a config setting, not an executor option; pass it as "
                              f"overrides={{'{dotted}': ...}}")
        close = difflib.get_close_matches(key, list(EXECUTOR_OPTIONS), n=2, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown executor option '{key}'{hint} (executor options: "
                          f"{', '.join(EXECUTOR_OPTIONS)}, or any submitit slurm_* parameter; config settings "
                          "go in overrides={'es.sigma': ...})")
    opts = {**EXECUTOR_OPTIONS, **options}
    if opts["cluster"] is not None and opts["cluster"] not in CLUSTERS:
        raise ConfigError(f"executor option cluster={opts['cluster']!r} is not allowed; choose one of "
                          f"{', '.join(CLUSTERS)} (or None to pick slurm when srun is on PATH)")
    for key in ("nodes", "time", "gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_delay_s",
                "max_requeues"):
        v = opts[key]
        low = 0 if key in ("gpus_per_node", "signal_delay_s", "max_requeues") else 1
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise ConfigError(f"executor option {key}={v!r} must be an integer >= {low}")
    if opts["mem_gb"] is not None and not (isinstance(opts["mem_gb"], (int, float)) and opts["mem_gb"] > 0):
        raise ConfigError(f"executor option mem_gb={opts['mem_gb']!r} must be a number > 0")
    return opts


def executor_parameters(cfg: Config, **options: Any) -> tuple[str, str | None, dict[str, Any]]:
    """(folder, cluster, parameters for ``AutoExecutor.update_parameters``) for these executor options."""
    opts = _check_options(options)
    tasks = opts["tasks_per_node"] or opts["gpus_per_node"] or 1
    cluster = opts["cluster"]
    if cluster in ("local", "debug") and (tasks > 1 or opts["nodes"] > 1):
        raise ConfigError(f"cluster={cluster} runs a single rank; for {opts['nodes'] * tasks} ranks use Slurm "
                          "(cluster='slurm') or `mpiexec -n N python -m hpc_es`")
    params: dict[str, Any] = {"name": opts["job_name"], "timeout_min": opts["time"], "nodes": opts["nodes"],
                              "tasks_per_node": tasks}
    if opts["gpus_per_node"]:
        params["gpus_per_node"] = opts["gpus_per_node"]
    if opts["cpus_per_task"] is not None:
        params["cpus_per_task"] = opts["cpus_per_task"]
    if opts["mem_gb"] is not None:
        params["mem_gb"] = opts["mem_gb"]
    if opts["partition"] is not None:
        params["slurm_partition"] = opts["partition"]
    params["slurm_signal_delay_s"] = opts["signal_delay_s"]
    params["slurm_max_num_timeout"] = opts["max_requeues"]
    params["slurm_additional_parameters"] = {"requeue": True}
    slurm_extra = {k: v for k, v in options.items() if k.startswith("slurm_")}
    srun_args = list(slurm_extra.pop("slurm_srun_args", None) or [])
    if opts["mpi"] and not any(a.startswith("--mpi") for a in srun_args):
        srun_args.insert(0, f"--mpi={opts['mpi']}")
    params["slurm_srun_args"] = srun_args
    extra_add = slurm_extra.pop("slurm_additional_parameters", None) or {}
    params["slurm_additional_parameters"].update(extra_add)
    params.update(slurm_extra)
    folder = opts["folder"] or os.path.join(cfg.run_dir, "submitit")
    return os.path.abspath(os.fspath(folder)), cluster, params


def make_executor(folder: str, cluster: str | None, params: dict[str, Any]) -> Any:
    import submitit

    params = dict(params)
    max_timeouts = params.pop("slurm_max_num_timeout", 3)  # a constructor argument, not a job parameter
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=max_timeouts)
    if executor.cluster != "slurm":  # slurm_* parameters are ignored elsewhere; keep the common ones
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    try:
        executor.update_parameters(**params)
    except (NameError, ValueError, TypeError) as e:  # submitit: unknown slurm_* parameter
        raise ConfigError(f"bad executor option: {e}") from None
    return executor


def submit(config: str | os.PathLike[str] | Config | None = None, *,
           overrides: Mapping[str, Any] | Sequence[str] | None = None, **options: Any) -> Any:
    """Submit a training run; returns the submitit Job (``job.job_id``; ``result(job)`` or
    ``job.results()[0]`` is a dict with ``final_dir``, ``fingerprint``, ``run_dir``, ``iterations``,
    ``world_size``).

    ``options`` are executor options (:data:`EXECUTOR_OPTIONS` or submitit ``slurm_*`` parameters) and
    config settings named after a top-level key or section (``run_dir="..."``, ``es={"sigma": 0.002}``);
    more config settings go in ``overrides``.  Bad input raises :class:`~hpc_es.errors.ConfigError`
    before anything is submitted.
    """
    items, options = split_keywords(overrides, options)
    cfg = resolve_config(config, items)
    folder, cluster, params = executor_parameters(cfg, **options)
    executor = make_executor(folder, cluster, params)
    from submitit.core.utils import FailedJobError  # a failing sbatch is one line, exit 2

    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; it is in the message
            return executor.submit(TrainingJob(cfg.to_dict()))
    except (FailedJobError, OSError) as e:
        raise submit_failed(executor, e) from None


def submit_failed(executor: Any, e: BaseException) -> HpcEsError:
    """A failed sbatch as one line (submitit's message ends with sbatch's own)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    why = lines[-1] if lines else type(e).__name__
    return HpcEsError(f"submitting to {executor.cluster} failed: {why} (is the Slurm controller reachable? try "
                      "`sinfo`; or run on this machine with --cluster local)")


def sbatch_script(config: str | os.PathLike[str] | Config | None = None, *,
                  overrides: Mapping[str, Any] | Sequence[str] | None = None, **options: Any) -> str:
    """The sbatch script :func:`submit` would hand to Slurm for these arguments (nothing is submitted).

    submitit has no public call that returns the script, so this uses its own helpers (private names):
    pyproject.toml pins submitit to the minor whose output tests/golden/submit_params.sh records."""
    import shlex

    from submitit.slurm.slurm import SlurmExecutor, _convert_mem, _make_sbatch_string

    items, options = split_keywords(overrides, options)
    cfg = resolve_config(config, items)
    folder, _cluster, params = executor_parameters(cfg, **options)
    names: dict[str, Any] = dict(SlurmExecutor._equivalence_dict())
    valid = SlurmExecutor._valid_parameters()
    sbatch: dict[str, Any] = {}
    for key, value in params.items():
        if key == "slurm_max_num_timeout":  # the executor's, not sbatch's
            continue
        name = key[len("slurm_"):] if key.startswith("slurm_") else names[key]
        if name not in valid:
            raise ConfigError(f"bad executor option: unknown Slurm parameter '{key}'")
        sbatch[name] = _convert_mem(value) if name == "mem" else value
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, **sbatch)


def result(job: Any) -> dict[str, Any]:
    """Wait for a job from :func:`submit` and return rank 0's result (every rank returns the same)."""
    return job.results()[0]


SUBMIT_USAGE = """usage: python -m hpc_es submit [--config FILE] [key=value ...] [--nodes N] [--gpus-per-node G]
                             [--tasks-per-node T] [--cpus-per-task C] [--mem-gb M] [--partition P]
                             [--time MIN] [--folder DIR] [--cluster slurm|local|debug] [--mpi pmix|pmi2|none]
                             [--job-name NAME] [--wait] [--dry-run]"""


def submit_main(argv: list[str]) -> int:
    """``python -m hpc_es submit``: submit, print the job id (and, with --wait, the result as JSON)."""
    p = argparse.ArgumentParser(prog="python -m hpc_es submit", usage=SUBMIT_USAGE, allow_abbrev=False)
    p.add_argument("--config", "-c", default=None, help="YAML config file")
    add_executor_arguments(p)
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result as JSON")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    args, rest, options = parse_command(p, argv)
    if args.dry_run:
        print(sbatch_script(args.config, overrides=rest, **options), end="")
        return 0
    job = submit(args.config, overrides=rest, **options)
    print(job.job_id, flush=True)
    if args.wait:
        print(json.dumps(result(job)), flush=True)
    return 0


def parse_command(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str], dict[str, Any]]:
    """(the parsed flags, the ``key=value`` settings, the executor options given) of a submit or sweep command
    line; an unknown flag is a config error."""
    args, rest = p.parse_known_args(argv)
    flags = [a for a in rest if a.startswith("-")]
    if flags:
        raise ConfigError(f"unknown option {flags[0]} for {p.prog.rsplit(' ', 1)[-1]}; config settings are given "
                          "as key=value")
    own = ("config", "wait", "dry_run", "seeds")
    return args, rest, {k: v for k, v in vars(args).items() if k not in own and v is not None}


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """The executor options as command-line flags (submit and sweep)."""
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem-gb", type=float)
    p.add_argument("--partition")
    p.add_argument("--time", type=int, help="time limit in minutes")
    p.add_argument("--folder", help="submitit logs (default: RUN_DIR/submitit)")
    p.add_argument("--cluster", choices=CLUSTERS)
    p.add_argument("--mpi", help="srun --mpi plugin: pmix (Open MPI, default), pmi2 (MPICH)")
    p.add_argument("--job-name")
