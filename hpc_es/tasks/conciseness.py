"""The paper's conciseness task: reward = -|len(completion) - len(reference)| in characters.

Without a data file a built-in synthetic set of short questions with short answers is used. It is
meant for the default demo, where a tiny random model can only learn to stop at the right length, so
prompts stay under 60 characters and references are 1-12 characters.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from hpc_es.errors import DataError
from hpc_es.tasks.base import Example, SplitTask
from hpc_es.tasks.countdown import read_json_list


def score(completion: str, reference: str) -> float:
    """Minus the character-length difference: 0 is best, any length mismatch costs linearly."""
    return -float(abs(len(completion) - len(reference)))


def _pick(item: dict[str, Any], keys: tuple[str, str], where: str) -> str:
    for key in keys:
        if key in item:
            value = item[key]
            if not isinstance(value, str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
            return value
    raise DataError(f"{where} has neither '{keys[0]}' nor '{keys[1]}' "
                    f"(keys: {', '.join(map(str, item)) or 'none'})")


def load_json(path: str) -> list[Example]:
    """Examples from a JSON list of {prompt | question, reference | answer}; the prompt is used verbatim."""
    out: list[Example] = []
    for i, item in enumerate(read_json_list(path)):
        where = f"data file '{path}': item {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where} is a {type(item).__name__}, expected an object with 'prompt' and 'reference'")
        prompt = _pick(item, ("prompt", "question"), where)
        if not prompt:
            raise DataError(f"{where}: the prompt is empty")
        reference = _pick(item, ("reference", "answer"), where)
        out.append(Example(prompt=prompt, info={"reference": reference, "index": i}))
    return out


# --------------------------------------------------------------------------------------------- synthetic

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                 "fifteen sixteen seventeen eighteen nineteen twenty").split()
_OPPOSITES = (("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("day", "night"),
              ("open", "closed"), ("happy", "sad"), ("early", "late"), ("wet", "dry"), ("full", "empty"),
              ("light", "dark"), ("left", "right"))
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_PLURALS = (("cat", "cats"), ("box", "boxes"), ("mouse", "mice"), ("child", "children"), ("foot", "feet"),
            ("city", "cities"), ("leaf", "leaves"), ("tooth", "teeth"), ("bus", "buses"), ("person", "people"))
_WORDS = ("cat", "dog", "sun", "tree", "blue", "rain", "book", "fish", "star", "milk")
_CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Egypt", "Cairo"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"))


def _qa(question: str, answer: str) -> tuple[str, str]:
    return f"Q: {question}\nA:", answer


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 20), r.randint(0, 20)
    return _qa(f"what is {a} plus {b}?", str(a + b))


def _times(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(2, 12), r.randint(2, 12)
    return _qa(f"what is {a} times {b}?", str(a * b))


def _minus(r: random.Random) -> tuple[str, str]:
    a = r.randint(10, 99)
    b = r.randint(0, a)
    return _qa(f"what is {a} minus {b}?", str(a - b))


def _in_words(r: random.Random) -> tuple[str, str]:
    n = r.randint(0, 20)
    return _qa(f"write {n} in words.", _NUMBER_WORDS[n])


def _next_letter(r: random.Random) -> tuple[str, str]:
    i = r.randint(0, 24)
    return _qa(f"which letter comes after {chr(97 + i)}?", chr(98 + i))


def _opposite(r: random.Random) -> tuple[str, str]:
    a, b = r.choice(_OPPOSITES)
    return _qa(f"what is the opposite of {a}?", b)


def _next_day(r: random.Random) -> tuple[str, str]:
    i = r.randrange(7)
    return _qa(f"what day comes after {_DAYS[i]}?", _DAYS[(i + 1) % 7])


def _plural(r: random.Random) -> tuple[str, str]:
    a, b = r.choice(_PLURALS)
    return _qa(f"what is the plural of {a}?", b)


def _repeat(r: random.Random) -> tuple[str, str]:
    w = r.choice(_WORDS)
    k = r.randint(1, 13 // (len(w) + 1))  # k words and k-1 spaces fit in 12 characters
    return _qa(f"say '{w}' {k} times.", " ".join([w] * k))


def _capital(r: random.Random) -> tuple[str, str]:
    a, b = r.choice(_CAPITALS)
    return _qa(f"what is the capital of {a}?", b)


def _upper(r: random.Random) -> tuple[str, str]:
    w = r.choice(_WORDS)
    return _qa(f"write '{w}' in capitals.", w.upper())


_GENERATORS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _add, _times, _minus, _in_words, _next_letter, _opposite, _next_day, _plural, _repeat, _capital, _upper)


def synthetic(n: int, seed: int) -> list[Example]:
    """``n`` short question/answer pairs of varied answer length, deterministic in ``seed``."""
    rng = random.Random(seed)
    out: list[Example] = []
    for index in range(n):
        prompt, reference = rng.choice(_GENERATORS)(rng)
        out.append(Example(prompt=prompt, info={"reference": reference, "index": index}))
    return out


# --------------------------------------------------------------------------------------------- the paper's

PAPER = "paper"  # data.path=paper: the paper's own prompts, below
# Qiu et al. 2025, Table 4 (training) and Table 5 (evaluation), verbatim.
PAPER_TRAIN = (("Solve: 3 + 5 =", "8"),
               ("If all birds can fly and penguins are birds, can penguins fly?", "No"))
PAPER_EVAL = (("What is the capital of France?", "Paris"),
              ("Calculate: 12 × 7 =", "84"),
              ("Is the statement “All cats are mammals” true or false?", "True"),
              ("What comes next in the sequence: 2, 4, 6, 8, ?", "10"),
              ("Translate “Hello” to Spanish:", "Hola"),
              ("What is 15% of 200?", "30"),
              ("Name one primary color:", "Red"),
              ("How many days are in a week?", "7"))


def paper_examples() -> tuple[list[Example], list[Example]]:
    """Table 4 as the training split, Table 5 as the test split."""
    def examples(pairs: tuple[tuple[str, str], ...]) -> list[Example]:
        return [Example(prompt=p, info={"reference": r, "index": i}) for i, (p, r) in enumerate(pairs)]

    return examples(PAPER_TRAIN), examples(PAPER_EVAL)


# --------------------------------------------------------------------------------------------- task

class ConcisenessTask(SplitTask):
    """Conciseness from ``cfg.data``: the file at ``data.path`` if set, else the synthetic set; split like Countdown.
    ``data.path=paper``: the paper's Table 4 trains and its Table 5 tests (``data.*_size`` do not apply)."""

    name = "conciseness"

    label = "conciseness"
    load_json = staticmethod(load_json)
    synthetic = staticmethod(synthetic)

    def __init__(self, cfg: Any) -> None:
        if cfg.data.path == PAPER:
            self._train, self._test = paper_examples()
        else:
            super().__init__(cfg)

    def score(self, completion: str, example: Example) -> float:
        return score(completion, example.info["reference"])
