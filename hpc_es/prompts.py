"""The text a model is given for a task's prompt: the raw prompt (``prompt.chat=false``, the paper's) or the
model folder's chat template around it (``prompt.chat=true``), with an optional system message.

Rendering happens once per example, before any generation, so every consumer (population rollouts, the
test split, the KL) sees the same text and tokenizes it the same way.  An instruct model answers a raw
prompt as a continuation of text; the chat template makes it answer as an assistant, which changes what a
length reward can find.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from hpc_es.errors import ConfigError
from hpc_es.tasks.base import Example


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How prompts are rendered: ``chat`` (the folder's chat template) and the system message (None: none)."""

    chat: bool = False
    system: str | None = None

    def render(self, tokenizer: Any, text: str) -> str:
        return render_prompt(tokenizer, text, self.chat, self.system)

    def examples(self, tokenizer: Any, examples: Sequence[Example]) -> list[Example]:
        """``examples`` with their prompts rendered (the same objects when the text is used raw)."""
        if not self.chat:
            return list(examples)
        return [dataclasses.replace(ex, prompt=self.render(tokenizer, ex.prompt)) for ex in examples]

    def ledger_attrs(self) -> dict[str, Any]:
        """What the ledger and the eval JSON record (the resolved system message, not just the config key)."""
        return {"prompt_chat": self.chat, "prompt_system": self.system or ""}


def prompt_format(cfg: Any, task: Any) -> PromptFormat:
    """The format ``cfg.prompt`` asks for: ``prompt.system``, else the task's ``default_system`` (chat only)."""
    system = cfg.prompt.system or getattr(task, "default_system", None) or None
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"task '{cfg.task}': default_system must be a string or None, got {type(system).__name__}")
    return PromptFormat(chat=bool(cfg.prompt.chat), system=system if cfg.prompt.chat else None)


def render_prompt(tokenizer: Any, text: str, chat: bool, system: str | None = None) -> str:
    """The text fed to the model for prompt ``text``: ``text`` itself, or (``chat``) the tokenizer's chat template
    over [system, user] with the generation prompt added.

    The result is meant to be tokenized as any prompt is (``tokenizer(text)``): a template that writes the BOS
    token itself loses it here when the tokenizer adds one, so that the ids are the template's, once."""
    if not chat:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("prompt.chat=true but the model folder's tokenizer has no chat template "
                          "(tokenizer_config.json 'chat_template' or chat_template.jinja); use prompt.chat=false")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    out = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    bos = getattr(tokenizer, "bos_token", None)
    if bos and out.startswith(bos):
        adds = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        if adds:
            out = out[len(bos):]
    return out
