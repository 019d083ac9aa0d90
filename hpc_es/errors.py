"""User-facing errors: one clear message, no traceback wall, non-zero exit."""

from __future__ import annotations

from hpc_es.stopping import EXIT_DISTRIBUTED, EXIT_USER_ERROR


class HpcEsError(Exception):
    """An error caused by the user's input (config, data, model dir, task code, world size).

    The CLI prints ``hpc_es: error: <message>`` and exits with ``exit_code``; anything else
    is a bug and keeps its traceback.
    """

    exit_code = EXIT_USER_ERROR
    quiet = False  # already reported (by another rank, or once for every rank): print nothing more


class ConfigError(HpcEsError):
    """A config key, type or range is wrong."""


class DataError(HpcEsError):
    """A data file is missing or malformed."""


class ModelError(HpcEsError):
    """A model directory is missing, unreadable or not a causal LM."""


class TaskError(HpcEsError):
    """A task cannot be loaded, or its reward function raised or returned a non-finite value."""


class DistributedError(HpcEsError):
    """A rank failed, the world size does not fit the population, or ranks diverged."""

    exit_code = EXIT_DISTRIBUTED


class ExtraMissing(HpcEsError):
    """A feature needs an optional dependency group (a pip "extra") that is not installed.

    Checked when the feature is asked for, so the core install (training, eval, replay) never needs it.
    """

    def __init__(self, feature: str, module: str, extra: str = "report") -> None:
        super().__init__(f"{feature} needs {module}, which is not installed; install the '{extra}' extra: "
                         f"pip install -e \".[{extra}]\"")
