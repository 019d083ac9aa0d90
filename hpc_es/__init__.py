"""hpc_es: full-parameter LLM fine-tuning with evolution strategies, for MPI and Slurm clusters."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def submit(config: Any, **overrides: Any) -> Any:
    """Submit a distributed training job with submitit; returns the submitit Job (see hpc_es.launch)."""
    from hpc_es.launch import submit as _submit

    return _submit(config, **overrides)


def result(job: Any) -> dict[str, Any]:
    """Wait for a job from :func:`submit`; rank 0's result (final_dir, fingerprint, run_dir, iterations, ...)."""
    from hpc_es.launch import result as _result

    return _result(job)
