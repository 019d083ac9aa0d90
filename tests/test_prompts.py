"""prompt.chat / prompt.system: the text a model is given, and its record in the ledger and the eval JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import TINY, ledger_arrays, run_hpc_es
from hpc_es.config import load_config
from hpc_es.errors import ConfigError
from hpc_es.prompts import PromptFormat, prompt_format, render_prompt
from hpc_es.tasks import load_task

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with a ChatML template in its tokenizer folder."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_model_dir, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = CHATML
    tok.save_pretrained(str(out))
    return str(out)


def test_raw_prompts_are_used_verbatim(tiny_model_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert render_prompt(tok, "Q: what is 2 plus 2?\nA:", chat=False, system="ignored") == "Q: what is 2 plus 2?\nA:"


def test_chat_renders_the_template_with_the_generation_prompt(chat_model_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    assert render_prompt(tok, "Solve: 3 + 5 =", chat=True) == (
        "<|im_start|>user\nSolve: 3 + 5 =<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(tok, "Hi", chat=True, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chat_without_a_template_is_a_config_error(tiny_model_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match="has no chat template"):
        render_prompt(tok, "Hi", chat=True)


class _BosTokenizer:
    """A tokenizer that adds BOS itself and whose template writes it too (Llama 3's way)."""

    chat_template = "x"
    bos_token, bos_token_id = "<s>", 1

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return "<s>" + "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [1] + [ord(c) for c in text]}


def test_a_template_bos_is_dropped_when_the_tokenizer_adds_one() -> None:
    assert render_prompt(_BosTokenizer(), "Hi", chat=True) == "[user]Hi[assistant]"


def test_system_message_prompt_system_then_the_task_default_chat_only() -> None:
    class WithDefault:
        name, default_system = "t", "You answer in one word."

    cfg = load_config(overrides=["prompt.chat=true"])
    assert prompt_format(cfg, WithDefault()) == PromptFormat(True, "You answer in one word.")
    cfg = load_config(overrides=["prompt.chat=true", "prompt.system=Be brief."])
    assert prompt_format(cfg, WithDefault()) == PromptFormat(True, "Be brief.")
    cfg = load_config(overrides=["prompt.system=Be brief."])  # raw text has no system turn
    assert prompt_format(cfg, WithDefault()) == PromptFormat(False, None)
    assert prompt_format(load_config(overrides=["prompt.chat=true"]), load_task(cfg)) == PromptFormat(True, None)


def test_chat_prompts_reach_training_and_eval_and_are_recorded(chat_model_dir: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_hpc_es(TINY + [f"model={chat_model_dir}", f"run_dir={run}", "prompt.chat=true", "prompt.system=Be brief.",
                       "eval.every=3", "eval.limit=4", "eval.kl=false"], check=True)
    attrs = ledger_arrays(run)["attrs"]
    assert bool(attrs["prompt_chat"]) is True and attrs["prompt_system"] == "Be brief."
    raw = tmp_path / "raw"
    run_hpc_es(TINY + [f"model={chat_model_dir}", f"run_dir={raw}", "eval.every=3", "eval.limit=4",
                       "eval.kl=false"], check=True)
    a, b = ledger_arrays(run), ledger_arrays(raw)
    assert bool(b["attrs"]["prompt_chat"]) is False and b["attrs"]["prompt_system"] == ""
    assert not (a["rewards"] == b["rewards"]).all()  # the model saw other text
    proc = run_hpc_es(["eval", f"model={chat_model_dir}", "prompt.chat=true", "eval.limit=4",
                       "rollout.max_new_tokens=8", "progress=false"], check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["prompt_chat"] is True and got["prompt_system"] == ""


def test_changing_the_prompt_format_is_another_trajectory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_hpc_es(TINY + [f"run_dir={run}", "es.iterations=1"], check=True)
    proc = run_hpc_es(TINY + [f"run_dir={run}", "prompt.system=Be brief."])
    assert proc.returncode != 0 and "different prompt" in proc.stderr
