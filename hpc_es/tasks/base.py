"""The task interface: a task yields prompts (with what its reward needs) and scores completions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class Example:
    prompt: str  # the full text fed to the model
    info: dict[str, Any] = field(default_factory=dict)  # what score() needs: numbers/target, reference, ...


@runtime_checkable
class Task(Protocol):
    """What ``task=`` resolves to.

    ``score`` sees the completion only (the generated text, never the prompt) and returns a finite float.
    """

    name: str

    def train_examples(self) -> Sequence[Example]: ...

    def test_examples(self) -> Sequence[Example]: ...

    def score(self, completion: str, example: Example) -> float: ...
