"""rollout.compile: the compiled decode step gives the eager step's tokens, and one that does not is refused.

The compiling tests are marked ``integration`` and run with HPC_ES_TEST_COMPILE=1 (as the noise kernels'
compile tests): torch.compile needs a C++ compiler and takes a minute or two per model on a small CPU, about
8 minutes for the four on 2 cores with a cold inductor cache, more than the whole suite's budget allows.
They share compiled code through the process (one compiled step serves every
model), so each model compiles once.  The refusal tests fake the compiled step and run in the unit subset.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, fingerprint_of, run_hpc_es
from test_fastgen import MODELS, PAD, batch, early_eos

from hpc_es import fastgen
from hpc_es.config import load_config
from hpc_es.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden" / "tiny_trace.json"
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on the CPU needs a C compiler")
compiles = pytest.mark.skipif(os.environ.get("HPC_ES_TEST_COMPILE") != "1",
                              reason="compiles (slow); HPC_ES_TEST_COMPILE=1")


def decode(model: torch.nn.Module, mode: str, ids: torch.Tensor, mask: torch.Tensor, new: int, eos: list[int],
           penalty: float = 1.0, stop_at: list[int] | None = None) -> torch.Tensor:
    fastgen.set_compile(model, mode)
    try:
        return fastgen.generate_ids(model, ids, mask, new, eos, PAD, repetition_penalty=penalty,
                                    observer=fastgen.Observer(stop_at) if stop_at else None)
    finally:
        fastgen.set_compile(model, "auto")


@needs_cc
@pytest.mark.integration
@compiles
@pytest.mark.parametrize("key", [("qwen2", 1), ("llama", 4)], ids=lambda k: f"{k[0]}-kv{k[1]}")
def test_compiled_decoder_gives_the_eager_tokens(key: tuple[str, int]) -> None:
    """fp32: rows stopping early (EOS and a stop schedule, so the batch compacts through several shapes), a
    repetition penalty; every shape's compiled step passed its check against the eager one (none refused)."""
    model = MODELS[key]
    ids, mask = batch(7, seed=21)
    new = 12
    eos = early_eos(model, ids, mask, new)
    stop_at = [12, 3, 12, 5, 8, 12, 2]
    eager = decode(model, "false", ids, mask, new, eos, 1.2, stop_at)
    compiled = decode(model, "true", ids, mask, new, eos, 1.2, stop_at)
    assert torch.equal(compiled, eager)
    st = fastgen._STATES[model]
    assert fastgen._COMPILE.get(model) != "refused" and len({key[0] for key in st.checked}) >= 2  # compacted, checked
    lengths = (compiled != PAD).sum(1)
    assert int(lengths.min()) < new and int(lengths.max()) == new  # rows did stop early


@needs_cc
@pytest.mark.integration
@compiles
def test_low_rank_pass_same_tokens_with_compile_on(tiny_model_dir: str) -> None:
    """A low-rank pass decodes eagerly whatever rollout.compile says (its factors are new tensors every
    pass): the same tokens with the setting on and off."""
    from hpc_es import lowrank
    from hpc_es.models import load_model, load_tokenizer
    from hpc_es.noise import KeyedNoise, member_seeds
    from hpc_es.rollout import generate_ids

    model, tok = load_model(tiny_model_dir, torch.float32, "cpu"), load_tokenizer(tiny_model_dir)
    lm = lowrank.LowRankModel(model, "frozen", 2, KeyedNoise(4096))
    seeds, signs = member_seeds(3, 0, 4, antithetic=True)
    prompts = [f"Q: what is {i} plus {i * 3}?\nA:" for i in range(3)]
    rows = [p for _ in range(len(seeds)) for p in prompts]
    sched = [2 + (3 * i) % 7 for i in range(len(rows))]
    out = {}
    for mode in ("false", "true"):
        fastgen.set_compile(model, mode)
        with lm.members(seeds.tolist(), signs.tolist(), 0.05, hooks=False) as lp:
            out[mode] = generate_ids(model, tok, rows, 8, engine="fast", lowrank=lp,
                                     observer=fastgen.Observer(sched))
    fastgen.set_compile(model, "auto")
    assert out["true"] == out["false"]
    assert min(map(len, out["true"])) < max(map(len, out["true"]))


@needs_cc
@pytest.mark.integration
@compiles
def test_demo_fingerprint_with_compile_on_and_off(tmp_path: Path) -> None:
    """The golden trace's run (compile off: test_trainer's golden test) with rollout.compile=true: the same
    rewards and final weights, and no refusal."""
    want = json.loads(GOLDEN.read_text())
    assert want["overrides"] == TINY
    run_dir = tmp_path / "compiled"
    proc = run_hpc_es(TINY + ["rollout.compile=true", f"run_dir={run_dir}"], check=True, timeout=900)
    assert "rollout.compile" not in proc.stderr
    assert fingerprint_of(run_dir / "final") == want["fingerprint"]


# ---- the check itself, with a fake compiled step (no compiler needed) -------------------------------------

def _wrong_token(dec: Any, b: int, S: int) -> torch.Tensor:
    logits = fastgen._Decoder.step(dec, b, S)
    dec.st.tok[:b] = (dec.st.tok[:b] + 1) % logits.shape[-1]
    return logits


def _broken(dec: Any, b: int, S: int) -> torch.Tensor:
    raise RuntimeError("inductor could not build a kernel")


@pytest.mark.parametrize("fake,why", [(_wrong_token, "picks other tokens"), (_broken, "failed to build")])
def test_a_compiled_step_that_differs_or_fails_is_refused_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fake: Any, why: str) -> None:
    model = MODELS[("qwen2", 4)]
    ids, mask = batch(7, seed=5)
    eager = decode(model, "false", ids, mask, 10, [0])
    monkeypatch.setattr(fastgen, "_SAID", set())
    monkeypatch.setattr(fastgen, "_compiled_step", lambda m, W: None if fastgen._COMPILE.get(m) == "refused"
                        else fake)
    with caplog.at_level(logging.WARNING, logger="hpc_es"):
        fastgen.set_compile(model, "true")
        got = fastgen.generate_ids(model, ids, mask, 10, [0], PAD)
        again = fastgen.generate_ids(model, ids, mask, 10, [0], PAD)
    assert fastgen._COMPILE[model] == "refused"
    fastgen.set_compile(model, "auto")
    assert torch.equal(got, eager) and torch.equal(again, eager)
    said = [r.getMessage() for r in caplog.records if "rollout.compile" in r.getMessage()]
    assert len(said) == 1 and why in said[0] and "decoding eagerly" in said[0]


def test_no_c_compiler_means_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    model = MODELS[("llama", 1)]
    ids, mask = batch(3, seed=2)
    eager = decode(model, "false", ids, mask, 6, [0])
    monkeypatch.setattr(fastgen, "_SAID", set())
    monkeypatch.setattr(fastgen.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="hpc_es"):
        got = decode(model, "true", ids, mask, 6, [0])
    assert torch.equal(got, eager)
    said = [r.getMessage() for r in caplog.records if "rollout.compile" in r.getMessage()]
    assert len(said) == 1 and "no C compiler" in said[0]


def test_rollout_compile_config_values(tmp_path: Path) -> None:
    assert load_config(None, []).rollout.compile == "auto"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("rollout:\n  compile: false\n")  # YAML reads a boolean
    assert load_config(str(cfg_file), []).rollout.compile == "false"
    assert load_config(None, ["rollout.compile=true"]).rollout.compile == "true"
    with pytest.raises(ConfigError, match="rollout.compile"):
        load_config(None, ["rollout.compile=sometimes"])
