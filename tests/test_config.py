"""Config: YAML + dotted overrides onto dataclasses, with errors that name the key and what is allowed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpc_es.config import all_keys, config_from_dict, load_config
from hpc_es.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_required_keys_exist() -> None:
    keys = set(all_keys())
    for k in ("model", "task", "seed", "run_dir", "es.population_size", "es.sigma", "es.alpha", "es.iterations"):
        assert k in keys


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("es:\n  sigma: 0.002\n  population_size: 8\nmodel: /m\n")
    cfg = load_config(str(f), ["es.population_size=10", "rollout.max_new_tokens=64", "es.antithetic=true"])
    assert (cfg.es.sigma, cfg.es.population_size, cfg.model) == (0.002, 10, "/m")
    assert cfg.rollout.max_new_tokens == 64 and cfg.es.antithetic is True


def test_ints_are_accepted_for_floats_and_round_trip_through_json() -> None:
    cfg = load_config(None, ["es.sigma=1", "seed=5"])
    assert cfg.es.sigma == 1.0 and isinstance(cfg.es.sigma, float)
    assert config_from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("override, words", [
    ("es.sigm=0.1", ["es.sigm", "es.sigma"]),
    ("es.populaton_size=4", ["es.populaton_size", "es.population_size"]),
    ("foo=1", ["unknown config key 'foo'"]),
    ("es.sigma=abc", ["es.sigma", "number", "abc"]),
    ("es.sigma=0", ["es.sigma", "> 0"]),
    ("es.sigma=-1e-3", ["es.sigma", "> 0"]),
    ("es.population_size=0", ["es.population_size", ">= 1"]),
    ("es.population_size=2.5", ["es.population_size", "integer"]),
    ("es.shaping=softmax", ["es.shaping", "zscore, rank"]),
    ("dist.backend=nccl", ["dist.backend", "mpi"]),
    ("dist.replicas_per_device=0", ["dist.replicas_per_device", ">= 1"]),
    ("es.antithetic=maybe", ["es.antithetic", "true or false"]),
    ("es=3", ["section"]),
    ("nokey", ["key=value"]),
])
def test_bad_overrides_name_the_key_and_what_is_allowed(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_antithetic_needs_an_even_population() -> None:
    with pytest.raises(ConfigError, match="even"):
        load_config(None, ["es.antithetic=true", "es.population_size=5"])


@pytest.mark.parametrize("text, words", [
    ("- a\n- b\n", ["mapping"]),
    ("es: {sigma: [1\n", ["not valid YAML"]),
    ("es:\n  alpah: 1\n", ["es.alpah", "es.alpha"]),
])
def test_bad_config_files(tmp_path: Path, text: str, words: list[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    for w in words:
        assert w in str(e.value)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/file.yaml")


def test_every_shipped_config_loads() -> None:
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    env = {"HPC_ES_MODELS": "/models", "HPC_ES_DATA": "/data"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for f in files:
            cfg = load_config(str(f))
            assert "$" not in cfg.model
            if f.name.startswith("countdown_"):
                assert (cfg.es.population_size, cfg.es.sigma, cfg.es.alpha, cfg.es.iterations) == (30, 1e-3, 5e-4, 500)
                assert (cfg.rollout.max_new_tokens, cfg.rollout.prompts_per_iteration) == (1024, 200)
                assert cfg.model.startswith("/models/") and cfg.data.path == "/data/countdown.json"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def test_unset_environment_variable_in_a_path_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPC_ES_NOPE", raising=False)
    with pytest.raises(ConfigError, match="HPC_ES_NOPE"):
        load_config(None, ["model=$HPC_ES_NOPE/qwen"])


def test_exponent_without_a_dot_in_yaml_is_a_number(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("es:\n  sigma: 1e-3\n  alpha: 5e-4\n")
    cfg = load_config(str(f))
    assert (cfg.es.sigma, cfg.es.alpha) == (1e-3, 5e-4)


def test_master_keys_and_their_choices() -> None:
    cfg = load_config(None, ["es.master_on=host", "es.master_dtype=float32"])
    assert (cfg.es.master_on, cfg.es.master_dtype) == ("host", "float32")
    assert (load_config(None, []).es.master_dtype, load_config(None, []).es.master_on) == ("model", "device")
    with pytest.raises(ConfigError, match="es.master_dtype.*model, float32"):
        load_config(None, ["es.master_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="es.master_on.*device, host"):
        load_config(None, ["es.master_on=gpu"])


def test_base_on_is_a_deprecated_alias_of_master_on(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import hpc_es.config as config

    monkeypatch.setattr(config, "_deprecation_noted", set())
    f = tmp_path / "old.yaml"
    f.write_text("es:\n  base_on: host\n")
    cfg = load_config(str(f))
    assert cfg.es.master_on == "host"
    assert load_config(None, ["es.base_on=host"]).es.master_on == "host"
    err = capsys.readouterr().err
    assert err.count("'es.base_on' is deprecated") == 1 and "es.master_on" in err  # one note per process
    ledger_config = json.loads(cfg.to_json())
    assert ledger_config["es"]["master_on"] == "host" and "base_on" not in ledger_config["es"]
    old = json.loads(cfg.to_json())  # a ledger written before the rename still loads
    old["es"]["base_on"] = old["es"].pop("master_on")
    del old["es"]["master_dtype"]
    again = config_from_dict(old)
    assert (again.es.master_on, again.es.master_dtype) == ("host", "model")
    with pytest.raises(ConfigError, match="es.master_on"):
        load_config(None, ["es.base_on=gpu"])
