"""`python -m hpc_es eval` in-process: eval.limit bounds the test items, and the schedule rule."""

from __future__ import annotations

from pathlib import Path

from hpc_es.config import load_config
from hpc_es.evaluate import evaluate
from hpc_es.schedule import Every


def test_eval_limit_bounds_the_items_of_the_eval_command(tmp_path: Path, tiny_model_dir: str) -> None:
    args = [f"model={tiny_model_dir}", "rollout.max_new_tokens=2", "progress=false", f"run_dir={tmp_path}"]
    limited = evaluate(load_config(None, [*args, "eval.limit=3"]))
    assert limited["examples"] == 3
    everything = evaluate(load_config(None, [*args, "data.test_size=5"]))
    assert everything["examples"] == 5


def test_every_k_iterations_and_the_last() -> None:
    assert [d for d in range(1, 11) if Every(4, 10).due(d)] == [4, 8, 10]
    assert [d for d in range(1, 11) if Every(5, 10).due(d)] == [5, 10]
    assert not any(Every(0, 10).due(d) for d in range(1, 11))
