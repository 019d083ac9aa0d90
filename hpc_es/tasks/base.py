"""The task interface: a task yields prompts (with what its reward needs) and scores completions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from hpc_es.errors import DataError


@dataclass(frozen=True)
class Example:
    prompt: str  # the full text fed to the model
    info: dict[str, Any] = field(default_factory=dict)  # what score() needs: numbers/target, reference, ...


@runtime_checkable
class Task(Protocol):
    """What ``task=`` resolves to.

    ``score`` sees the completion only (the generated text, never the prompt) and returns a finite float.
    A task may also set ``default_system`` (a str, or None): the system message under ``prompt.chat=true``
    when ``prompt.system`` is unset (hpc_es.prompts).
    """

    name: str

    def train_examples(self) -> Sequence[Example]: ...

    def test_examples(self) -> Sequence[Example]: ...

    def score(self, completion: str, example: Example) -> float: ...


def split_examples(items: Sequence[Example], train_size: int, test_size: int,
                   source: str) -> tuple[list[Example], list[Example]]:
    """First ``train_size`` items train, the next ``test_size`` (0 = all the rest) test.

    Fails when the source cannot fill both splits, so a short file is caught before any compute is spent.
    """
    need_test = max(test_size, 1)
    if len(items) < train_size + need_test:
        want = (f"{train_size} train + {test_size} test" if test_size
                else f"{train_size} train + at least 1 test")
        raise DataError(f"{source} has {len(items)} items, too few for data.train_size={train_size} and "
                        f"data.test_size={test_size} ({want} = {train_size + need_test} needed)")
    train = list(items[:train_size])
    test = list(items[train_size:train_size + test_size]) if test_size else list(items[train_size:])
    return train, test


class SplitTask:
    """A task over one list of examples split by ``cfg.data``: the file at ``data.path`` when set, else the
    task's built-in set (by default seeded synthetic).  Subclasses give ``name``, ``label``, ``load_json`` and
    ``synthetic`` (or ``builtin``)."""

    name = "task"
    label = "task"
    default_system: str | None = None  # prompt.chat=true without prompt.system: this system message (None: none)

    def __init__(self, cfg: Any) -> None:
        data = cfg.data
        if data.path:
            items = self.load_json(data.path)
            source = f"data file '{data.path}'"
        else:
            items, source = self.builtin(data, cfg.seed)
        self._train, self._test = split_examples(items, data.train_size, data.test_size, source)

    def builtin(self, data: Any, seed: int) -> tuple[list[Example], str]:
        """The examples used without a data file, and how a split error names them: the seeded synthetic set."""
        return (self.synthetic(data.synthetic_size, seed),
                f"the synthetic {self.label} set (data.synthetic_size={data.synthetic_size})")

    @staticmethod
    def load_json(path: str) -> list[Example]:
        raise NotImplementedError

    @staticmethod
    def synthetic(n: int, seed: int) -> list[Example]:
        raise NotImplementedError

    def train_examples(self) -> Sequence[Example]:
        return self._train

    def test_examples(self) -> Sequence[Example]:
        return self._test
