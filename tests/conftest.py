"""Shared fixtures: one tiny-model cache per test session, and a runner for `python -m hpc_es` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Every process the tests start shares one tiny-model cache, built once.
os.environ.setdefault("HPC_ES_CACHE", os.path.join(tempfile.gettempdir(), "hpc_es_test_cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
os.environ.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")

# A tiny, fast run: 4 members, 3 iterations, 4 prompts of 8 new tokens, one CPU thread.
TINY = ["es.population_size=4", "es.iterations=3", "es.sigma=0.05", "es.alpha=0.02",
        "rollout.max_new_tokens=8", "rollout.prompts_per_iteration=4", "threads=1", "progress=false",
        "checkpoint.every=0"]
# The smallest run that still checkpoints (the durability cases): 4 members, 2 prompts of 4 new tokens.
SMALL = ["model=tiny", "es.population_size=4", "rollout.prompts_per_iteration=2", "rollout.max_new_tokens=4",
         "checkpoint.every=2", "threads=1", "progress=false"]


def run_hpc_es(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
               launcher: list[str] | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m hpc_es ARGS`` (optionally under a launcher such as mpiexec) from the repo root."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    cmd = (launcher or []) + [PY, "-m", "hpc_es"] + list(args)
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def mpiexec(n: int) -> list[str]:
    exe = Path(PY).parent / "mpiexec"
    return [str(exe if exe.exists() else "mpiexec"), "-n", str(n), "--oversubscribe"]


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The built-in tiny model's folder (built once per session)."""
    from hpc_es.config import Config
    from hpc_es.models import ensure_tiny_model

    return ensure_tiny_model(Config().tiny, os.environ["HPC_ES_CACHE"])


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-process run of the TINY config: the result every other launch must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_hpc_es(TINY + [f"run_dir={run_dir}"], check=True)
    return run_dir


def fingerprint_of(model_dir: Path | str) -> str:
    from hpc_es.models import fingerprint_dir

    return fingerprint_dir(str(model_dir))


def perturbed_model(path: str, scale: float = 0.02, seed: int = 5) -> Any:
    """The model in ``path`` with seeded Gaussian noise of std ``scale`` added to every parameter (a "fine-tuned"
    model for the KL tests)."""
    import torch

    from hpc_es.models import load_model

    model = load_model(path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def ledger_arrays(run_dir: Path | str) -> dict:
    import h5py

    with h5py.File(Path(run_dir) / "log.h5", "r") as f:
        return {k: f[k][()] for k in f.keys()} | {"attrs": dict(f.attrs)}


# A user task file (task=<file>.py) whose reward body the test fills in: `user_task("return 1.0")`.
_USER_TASK = '''
import sys
from hpc_es.tasks import Example

class T:
    name = "user"
    def train_examples(self):
        return [Example("Q: hi\\nA:", {}) for _ in range(4)]
    def test_examples(self):
        return self.train_examples()
    def score(self, completion, example):
        {body}

task = T()
'''


def user_task(body: str) -> str:
    """The source of a one-prompt user task whose ``score`` runs ``body``."""
    return _USER_TASK.replace("{body}", body)


GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE_GOLDEN = "HPC_ES_UPDATE_GOLDEN"


def check_golden(name: str, text: str, folder: Path = GOLDEN) -> None:
    """``text`` must equal the checked-in golden file ``name``.  A missing file fails (a lost golden file
    must not pass silently); ``HPC_ES_UPDATE_GOLDEN=1`` writes the files instead, on purpose."""
    path = folder / name
    if os.environ.get(UPDATE_GOLDEN) == "1":
        path.write_text(text)
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; if that is intended, regenerate it with {UPDATE_GOLDEN}=1",
                    pytrace=False)
    assert text == path.read_text(), f"{name} changed; rerun with {UPDATE_GOLDEN}=1 if that is intended"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A safety net for the markers: a test that uses a fixture which starts processes is marked with it."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "slurm_cluster" in fixtures and not item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slurm)
        if "reference_run" in fixtures and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)


from slurm_cluster import slurm_cluster  # noqa: E402,F401  (a session fixture: a real Slurm cluster)
