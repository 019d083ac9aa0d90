"""YAML that would explode is refused with one short line (issue 24): alias bombs, deep nesting, keys given
twice; no message formats an unbounded value."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_es.config import MAX_YAML_VALUES, load_config
from hpc_es.errors import ConfigError


def refused(tmp_path: Path, text: str) -> str:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert len(str(e.value)) < 400, str(e.value)[:400]
    return str(e.value)


def test_an_alias_bomb_under_a_valid_key_is_refused(tmp_path: Path) -> None:
    lines = ["x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = "bombs:\n" + "\n".join("  " + ln for ln in lines) + "\nes:\n  sigma: *a8\n"
    msg = refused(tmp_path, text)
    assert msg == f"config file '{tmp_path / 'c.yaml'}' expands to more than {MAX_YAML_VALUES:,} values (YAML aliases?)"


def test_a_long_value_is_shown_short(tmp_path: Path) -> None:
    text = "es:\n  sigma: [" + ", ".join(["long-string-" * 20] * 50) + "]\n"
    msg = refused(tmp_path, text)
    assert msg.startswith("config key 'es.sigma' must be a number, got ['long-string-")


@pytest.mark.parametrize("text", ["a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 2000)) + "  " * 2000 + "v",
                                  "es: " + "[" * 100_000 + "]" * 100_000 + "\n"])
def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path: Path, text: str) -> None:
    assert "nests more than 64 levels deep" in refused(tmp_path, text)


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    msg = refused(tmp_path, "es:\n  sigma: 0.1\nseed: 3\nes:\n  alpha: 0.2\n")
    assert msg == f"config file '{tmp_path / 'c.yaml'}' gives key 'es' twice in one mapping (the first would be " \
                  "ignored); give it once"


def test_an_ordinary_config_still_loads(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("es:\n  sigma: 0.01\n  alpha: 0.002\nseed: 3\n")
    cfg = load_config(str(f), ["rollout.max_new_tokens=16"])
    assert (cfg.es.sigma, cfg.es.alpha, cfg.seed, cfg.rollout.max_new_tokens) == (0.01, 0.002, 3, 16)


def test_an_unknown_huge_key_is_shown_short() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["k" * 100_000 + "=1"])
    assert len(str(e.value)) < 300
