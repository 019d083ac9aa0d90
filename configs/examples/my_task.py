"""A minimal user task: reward completions that contain a keyword.

Use it with ``task=configs/examples/my_task.py:task`` (a Task object) or
``task=configs/examples/my_task.py:make_task`` (a callable taking the Config and returning a Task).
A module on the import path works the same way: ``task=my_package.my_module:task``.

The interface (hpc_es/tasks/base.py) is four members:

- ``name``: a short string, used in logs and error messages.
- ``train_examples()`` / ``test_examples()``: sequences of ``hpc_es.tasks.Example(prompt, info)``.
  ``prompt`` is the exact text fed to the model; ``info`` is a dict holding whatever ``score`` needs
  (here: nothing beyond the keyword, but typically a reference answer).
- ``score(completion, example) -> float``: the reward for one completion. It sees only the generated
  text, never the prompt, and must return a finite number. Evolution strategies only compare rewards
  within a population, so the scale does not matter, but ties everywhere (e.g. all zeros) give no signal:
  partial credit helps.

If ``score`` raises or returns NaN/inf, the run stops with an error naming the task and the prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

from hpc_es.tasks import Example

_PROMPTS = [
    "Q: name a fruit.\nA:",
    "Q: what is yellow and curved?\nA:",
    "Q: what do monkeys like to eat?\nA:",
    "Q: suggest a snack.\nA:",
    "Q: what goes in a smoothie?\nA:",
    "Q: what fruit is long?\nA:",
]


class KeywordTask:
    """Reward 1.0 when the completion mentions ``keyword``, plus a little credit for being short."""

    name = "keyword"

    def __init__(self, keyword: str = "banana", max_chars: int = 40) -> None:
        self.keyword = keyword.lower()
        self.max_chars = max_chars
        examples = [Example(prompt=p, info={"keyword": self.keyword}) for p in _PROMPTS]
        self._train, self._test = examples[:4], examples[4:]

    def train_examples(self) -> Sequence[Example]:
        return self._train

    def test_examples(self) -> Sequence[Example]:
        return self._test

    def score(self, completion: str, example: Example) -> float:
        hit = 1.0 if example.info["keyword"] in completion.lower() else 0.0
        brevity = max(0.0, 1.0 - len(completion) / self.max_chars)  # partial credit breaks ties
        return hit + 0.1 * brevity


def make_task(cfg: Any) -> KeywordTask:
    """Factory form: a callable receives the run's Config, e.g. to read ``cfg.seed`` or ``cfg.data.path``."""
    return KeywordTask()


task = KeywordTask()
