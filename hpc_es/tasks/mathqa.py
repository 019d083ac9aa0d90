"""Math reasoning (``task=math``): free-form problems whose final answer is the completion's last ``\\boxed{}``.

Reward 1 when that answer equals the reference by symbolic equivalence, else 0, as a MATH grader reads
answers: ``\\dfrac{1}{2}``, ``0.5`` and ``50\\%`` agree; units and ``\\text{}`` wrappers are ignored; ``1,000``
is one thousand; intervals, tuples and sets compare as such.  The comparison is math-verify's (sympy), run
by :mod:`hpc_es.tasks.symbolic` so that the reward time limit can always stop it.

Only the last ``\\boxed{...}`` counts (a model may box intermediate results); its braces are matched, with
``\\{`` and ``\\}`` read as literal braces.  A last box whose braces never close, or an empty one, scores 0.
With :func:`with_format` (``task=hpc_es.tasks.mathqa:with_format``) a completion whose last box holds an
answer also gets :data:`FORMAT_WEIGHT`, right or wrong: a small push towards boxing an answer at all, for
models that rarely do; ``task=math`` is the plain 1/0 reward.

Data: a JSON list or a JSONL file (``.jsonl``) of objects with the problem in ``problem`` or ``question``
and the reference in ``answer`` (a GSM8K answer's text after its last ``####``) or, without ``answer``, the
last ``\\boxed{}`` of ``solution`` (README, "Math").  Without ``data.path`` the built-in sample
(math_sample.jsonl, a few dozen hand-written problems) is used.

Prompt: the problem, then :data:`INSTRUCTION`, as raw text (no chat template needed).  Under ``prompt.chat``
the instruction is the task's ``default_system`` and the user turn is the problem alone, unless a
``prompt.system`` of the user's replaces it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

from hpc_es.errors import DataError
from hpc_es.fsio import MAX_DATA_BYTES, read_text_file
from hpc_es.prompts import prompt_format
from hpc_es.tasks.base import Example, SplitTask
from hpc_es.tasks.countdown import read_json_list
from hpc_es.tasks.symbolic import grader

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SAMPLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_sample.jsonl")
FORMAT_WEIGHT = 0.1


# --------------------------------------------------------------------------------------------- answers

def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text``, or None when there is none or its braces never close."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    j = i
    while j < len(text):
        c = text[j]
        if c == "\\":  # \{ \} are literal braces (a set); \\ is a line break
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None


def _answer(completion: str) -> str | None:
    answer = last_boxed(completion)
    return answer if answer is not None and answer.strip() else None


@functools.lru_cache(maxsize=4096)
def _equivalent(reference: str, answer: str) -> bool:
    """Remembered: ``eval`` asks for the reward and the accuracy of each completion, and greedy members often
    give the same answers (a grading that raised or was stopped is not remembered)."""
    return grader().equivalent(reference, answer)


def is_correct(completion: str, reference: str) -> bool:
    """Whether the completion's last boxed answer equals ``reference`` (LaTeX, no ``\\boxed``)."""
    answer = _answer(completion)
    return answer is not None and _equivalent(reference, answer)


def score(completion: str, reference: str, format_weight: float = 0.0) -> float:
    """1 for a correct last boxed answer, else 0; plus ``format_weight`` when the last box holds any answer."""
    if _answer(completion) is None:
        return 0.0
    return float(is_correct(completion, reference)) + format_weight


# --------------------------------------------------------------------------------------------- data

def make_prompt(problem: str) -> str:
    """The raw prompt: the problem and the instruction to box the final answer (no chat template needed)."""
    return f"{problem}\n{INSTRUCTION}\n"


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return str(value)


def _reference(item: dict[str, Any], where: str) -> str:
    if "answer" in item:
        answer = _text(item, "answer", where)
        if "####" in answer:  # GSM8K: worked solution, then "#### <final answer>"
            answer = answer.rsplit("####", 1)[1]
        answer = answer.strip()
        if len(answer) > 1 and answer[0] == answer[-1] == "$":
            answer = answer[1:-1].strip()
    elif "solution" in item:
        answer = (last_boxed(_text(item, "solution", where)) or "").strip()
        if not answer:
            raise DataError(f"{where}: 'solution' has no \\boxed{{...}} answer (and there is no 'answer' key)")
    else:
        raise DataError(f"{where} has neither 'answer' nor 'solution' (keys: {', '.join(map(str, item)) or 'none'})")
    if not answer:
        raise DataError(f"{where}: the answer is empty")
    return answer


def _item_to_example(item: Any, index: int, where: str) -> Example:
    if not isinstance(item, dict):
        raise DataError(f"{where} is a {type(item).__name__}, expected an object with 'problem' and 'answer'")
    key = next((k for k in ("problem", "question") if k in item), None)
    if key is None:
        raise DataError(f"{where} has neither 'problem' nor 'question' (keys: {', '.join(map(str, item)) or 'none'})")
    problem = _text(item, key, where).strip()
    if not problem:
        raise DataError(f"{where}: the problem is empty")
    return Example(prompt=make_prompt(problem),
                   info={"problem": problem, "reference": _reference(item, where), "index": index})


def _read_jsonl(path: str) -> list[Any]:
    text = read_text_file(path, "data file", MAX_DATA_BYTES, DataError)
    out: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"data file '{path}' line {lineno} is not valid JSON: {e.msg} "
                            f"at column {e.colno}") from None
        except RecursionError:
            raise DataError(f"data file '{path}' line {lineno} nests its JSON too deeply") from None
    if not out:
        raise DataError(f"data file '{path}' holds no items")
    return out


def load_json(path: str) -> list[Example]:
    """Examples from a JSON list, or from JSONL when the name ends in ``.jsonl`` (the module docstring's keys)."""
    items = _read_jsonl(path) if path.endswith(".jsonl") else read_json_list(path)
    return [_item_to_example(item, i, f"data file '{path}': item {i}") for i, item in enumerate(items)]


# --------------------------------------------------------------------------------------------- task

class MathTask(SplitTask):
    """Math from ``cfg.data``: the file at ``data.path`` if set, else the built-in sample; split like Countdown."""

    name = "math"
    label = "math"
    # the system message when a chat template is used (prompt.chat) and prompt.system is not set
    default_system: str | None = INSTRUCTION
    load_json = staticmethod(load_json)

    def __init__(self, cfg: Any, format_weight: float = 0.0) -> None:
        super().__init__(cfg)
        self.format_weight = format_weight
        if prompt_format(cfg, self).system == INSTRUCTION:
            # The chat template's system message already asks for the box: the user turn is the problem
            # alone, as in Qwen2.5-Math's chat prompts.
            self._train = [dataclasses.replace(e, prompt=e.info["problem"]) for e in self._train]
            self._test = [dataclasses.replace(e, prompt=e.info["problem"]) for e in self._test]
        grader().start()  # fails here, before any compute, when math-verify is missing

    def builtin(self, data: Any, seed: int) -> tuple[list[Example], str]:
        items = load_json(SAMPLE_PATH)
        return items, f"the built-in math sample ({len(items)} problems)"

    def score(self, completion: str, example: Example) -> float:
        return score(completion, example.info["reference"], self.format_weight)

    def is_correct(self, completion: str, example: Example) -> bool:
        """Accuracy: the last boxed answer is right (the format term aside)."""
        return is_correct(completion, example.info["reference"])


def with_format(cfg: Any) -> MathTask:
    """``task=hpc_es.tasks.mathqa:with_format``: the math reward plus :data:`FORMAT_WEIGHT` for a boxed answer."""
    return MathTask(cfg, format_weight=FORMAT_WEIGHT)
