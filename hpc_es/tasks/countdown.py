"""The paper's Countdown task: reach a target with 3-4 given numbers and + - * /.

Reward and data format follow the paper's public release: ``reward = 0.1 * format + answer``, with the
same regular expressions (and so Python's ``$``, which also matches before a final newline).  Answers are
computed by a safe parser (:mod:`hpc_es.tasks.arith`) instead of ``eval``; it computes what ``eval`` did,
``**`` and ``//`` included.  The differences kept on purpose (README, "Tasks"; checked against a restatement
of the published rules in tests/test_countdown_reference.py):

- only the completion is scored (the paper's training script scored prompt + completion by mistake);
- an answer with an integer literal of over 4,300 digits scores 0 (the published code raised an error);
- a power too large to compute (over ``arith.MAX_POWER_BITS`` bits) scores 0, where ``eval`` would hang;
- a chain of thousands of unary signs is computed, where Python's compiler gives up (its depth limit follows
  the interpreter's recursion limit and call depth, about 3,000).
"""

from __future__ import annotations

import json
import math
import random
import re
from fractions import Fraction
from typing import Any, Sequence

from hpc_es.errors import DataError
from hpc_es.tasks.arith import compute, integers_in
from hpc_es.tasks.base import Example, SplitTask

_FULL_FORMAT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_CHARS = re.compile(r"^[0-9+\-*/() ]+$")


# --------------------------------------------------------------------------------------------- reward

def format_score(text: str) -> float:
    """1.0 for exactly ``<think>...</think>\\n<answer>...</answer>``.

    Otherwise partial credit: 0.1 for a think pair anywhere plus 0.5 for an answer pair anywhere.
    """
    if _FULL_FORMAT.match(text):
        return 1.0
    out = 0.0
    if _THINK.search(text):
        out += 0.1
    if _ANSWER.search(text):
        out += 0.5
    return out


def answer_score(completion: str, numbers: Sequence[int], target: int | float | str) -> float:
    """1.0 when the last ``<answer>`` uses exactly the given numbers and evaluates to the target, else 0.0."""
    try:
        found = _ANSWER.findall(completion)
        if not found:
            return 0.0
        content = found[-1]
        if not content or not _ANSWER_CHARS.match(content):
            return 0.0
        # "$" lets one final newline through the character check, and eval() reads "44 + 19\n" as 44 + 19
        content = content.removesuffix("\n")
        if sorted(integers_in(content)) != sorted(int(n) for n in numbers):
            return 0.0
        return 1.0 if abs(compute(content) - float(target)) < 1e-5 else 0.0
    except Exception:  # the paper's rule: any error scores 0 (here also a literal too long for int())
        return 0.0


def correct_by_paper_rule(completion: str, numbers: Sequence[int], target: int | float | str) -> bool:
    """Correct as the published evaluation counted it: it kept a target only when ``str(target).isdigit()``
    (reading it with ``int``), and scored every other item 0."""
    text = target if isinstance(target, str) else str(target)
    if not text.isdigit():
        return False
    try:
        value = int(text)
    except ValueError:  # digits int() does not read, e.g. superscripts
        return False
    return answer_score(completion, numbers, value) > 0


def score(completion: str, numbers: Sequence[int], target: int | float | str) -> float:
    """The paper's Countdown reward: ``0.1 * format("<think>" + completion) + answer`` (max 1.1).

    The prompt ends in ``<think>``, so the completion starts inside the think block; prefixing it makes
    the format check see the whole response.
    """
    return 0.1 * format_score("<think>" + completion) + answer_score(completion, numbers, target)


# --------------------------------------------------------------------------------------------- prompts

def format_numbers(numbers: Sequence[int]) -> str:
    """Numbers as numpy prints a small int array: ``[ 8 16 56]`` (right-aligned to the widest, one space apart)."""
    texts = [str(int(n)) for n in numbers]
    width = max((len(t) for t in texts), default=0)
    return "[" + " ".join(t.rjust(width) for t in texts) + "]"


def format_target(target: int | float | str) -> str:
    """The target as the prompt shows it: strings verbatim, integral numbers without a trailing ``.0``."""
    if isinstance(target, str):
        return target.strip()
    if isinstance(target, float) and target.is_integer():
        return str(int(target))
    return str(target)


_SYSTEM = ("You are a helpful assistant who first thinks about the reasoning process "
           "and then gives the user the answer.")
_RULES = "You may use basic arithmetic operations (+, -, *, /) and each number only once."
_SHOW = "Show your work in <think> </think> tags."
_RETURN = "Return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
_START = "Let me solve this step by step.\n<think>"


def make_prompt(numbers: Sequence[int], target: int | float | str) -> str:
    """A prompt shaped like the paper's ``context`` field, for items that do not carry one.

    Sentences are concatenated with no space after each full stop, as in the paper's data.
    """
    ask = f"Using the numbers {format_numbers(numbers)}, create an equation that equals {format_target(target)}."
    return "".join([_SYSTEM, ask, _RULES, _SHOW, _RETURN, _START])


# --------------------------------------------------------------------------------------------- data

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_target(target: Any) -> str | None:
    """Why ``target`` is unusable, or None."""
    if isinstance(target, bool) or not isinstance(target, (int, float, str)):
        return f"'target' must be a number or a numeric string, got {type(target).__name__}"
    try:
        value = float(target)
    except (ValueError, OverflowError):
        return f"'target' {target!r} is not a number"
    if not math.isfinite(value):
        return f"'target' {target!r} is not finite"
    return None


def _item_to_example(item: Any, index: int, path: str) -> Example:
    where = f"data file '{path}': item {index}"
    if not isinstance(item, dict):
        raise DataError(f"{where} is a {type(item).__name__}, expected an object with 'numbers' and 'target'")
    for key in ("numbers", "target"):
        if key not in item:
            raise DataError(f"{where} has no '{key}' key (keys: {', '.join(map(str, item)) or 'none'})")
    nums = item["numbers"]
    if not isinstance(nums, list) or not all(_is_int(n) for n in nums):
        raise DataError(f"{where}: 'numbers' must be a list of integers, got {nums!r}")
    if not 3 <= len(nums) <= 4:
        raise DataError(f"{where}: 'numbers' must hold 3 or 4 integers, got {len(nums)}")
    if any(n < 0 for n in nums):
        raise DataError(f"{where}: 'numbers' must be non-negative, got {nums!r}")
    problem = _check_target(item["target"])
    if problem:
        raise DataError(f"{where}: {problem}")
    context = item.get("context")
    if context is not None and (not isinstance(context, str) or not context):
        raise DataError(f"{where}: 'context' must be a non-empty string when present")
    info: dict[str, Any] = {"numbers": list(nums), "target": item["target"], "index": index}
    for key in ("id", "solution"):
        if key in item:
            info[key] = item[key]
    prompt = context if context is not None else make_prompt(nums, item["target"])
    return Example(prompt=prompt, info=info)


def read_json_list(path: str) -> list[Any]:
    """A data file's top-level JSON list, or a DataError saying why not (shared by the built-in tasks)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"data file '{path}' does not exist") from None
    except IsADirectoryError:
        raise DataError(f"data file '{path}' is a directory") from None
    except UnicodeDecodeError as e:
        raise DataError(f"data file '{path}' is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"data file '{path}' is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except OSError as e:
        raise DataError(f"data file '{path}' cannot be read: {e.strerror}") from None
    if not isinstance(data, list):
        raise DataError(f"data file '{path}' must hold a JSON list of objects, got a {type(data).__name__}")
    if not data:
        raise DataError(f"data file '{path}' holds an empty list")
    return data


def load_json(path: str) -> list[Example]:
    """Examples from a file in the paper's format: a JSON list of {numbers, target[, context, id, solution]}.

    ``context``, when present, is the prompt verbatim so results stay comparable with the paper.
    """
    return [_item_to_example(item, i, path) for i, item in enumerate(read_json_list(path))]


_OPS = ("+", "-", "*", "/")


def _random_solution(numbers: list[int], rng: random.Random) -> tuple[Fraction, str]:
    """Combine ``numbers`` pairwise at random into one expression; division only when exact."""
    pool: list[tuple[Fraction, str]] = [(Fraction(n), str(n)) for n in numbers]
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        (a, ea), (b, eb) = pool[i], pool[j]
        for k in sorted((i, j), reverse=True):
            pool.pop(k)
        ops = [op for op in _OPS if op != "/" or (b != 0 and (a / b).denominator == 1)]
        op = rng.choice(ops)
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        else:
            value = a / b
        pool.append((value, f"({ea} {op} {eb})"))
    value, expr = pool[0]
    return value, expr[1:-1] if len(numbers) > 1 else expr


def synthetic(n: int, seed: int) -> list[Example]:
    """``n`` solvable items, each with 3-4 numbers in 1..99 and a positive integer target up to 999.

    Deterministic in ``seed`` (its own ``random.Random``). The hidden solution is kept in ``info["solution"]``.
    """
    rng = random.Random(seed)
    out: list[Example] = []
    for index in range(n):
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        for _ in range(1000):
            value, solution = _random_solution(numbers, rng)
            if value.denominator == 1 and 1 <= value <= 999:
                break
        else:  # practically unreachable; a sum is always a valid positive target
            solution = " + ".join(map(str, numbers))
            value = Fraction(sum(numbers))
        target = int(value)
        out.append(Example(prompt=make_prompt(numbers, target),
                           info={"numbers": numbers, "target": target, "solution": solution, "index": index}))
    return out


# --------------------------------------------------------------------------------------------- task

class CountdownTask(SplitTask):
    """Countdown from ``cfg.data``: the file at ``data.path`` if set, else the built-in synthetic set.

    The first ``data.train_size`` items train, the next ``data.test_size`` (0 = all the rest) test, which
    with the paper's file gives its 200/2000 split.
    """

    name = "countdown"

    label = "Countdown"
    load_json = staticmethod(load_json)
    synthetic = staticmethod(synthetic)

    def score(self, completion: str, example: Example) -> float:
        return score(completion, example.info["numbers"], example.info["target"])

    def is_correct(self, completion: str, example: Example) -> bool:
        """The paper's accuracy: the answer part of the reward is positive."""
        return answer_score(completion, example.info["numbers"], example.info["target"]) > 0

    def is_correct_paper(self, completion: str, example: Example) -> bool:
        """The published evaluation's rule: as :meth:`is_correct`, but the target is read with ``isdigit()``.

        Negative or non-integer targets (``"-11"``, ``"27.4"``; 58 of the paper's 2,000 test items) never count.
        """
        return correct_by_paper_rule(completion, example.info["numbers"], example.info["target"])
