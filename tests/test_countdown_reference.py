"""hpc_es's Countdown reward against an independent restatement of the published rules.

The restatement below follows the rules as published (see the README's Countdown section): the format
regular expressions applied to ``"<think>" + completion`` with Python's ``re`` (so ``$`` also matches before a
final newline), the last ``<answer>`` block, the allowed characters, the sorted-number check, and Python's own
``eval`` of the answer compared with ``float(target)`` within 1e-5.  It is run on many thousands of seeded,
generated completions and must agree with ``hpc_es.tasks.countdown.score`` exactly, except for the
differences kept on purpose, each asserted by its own test here:

1. only the completion is scored (the paper's training script scored prompt + completion): a matter of what
   the trainer passes in, not of this function, so there is nothing to compare;
2. an integer literal of more than 4,300 digits: the published code raised an error (``int()`` refuses such a
   string), hpc_es scores the answer 0;
3. a power too large to compute (over ``arith.MAX_POWER_BITS`` bits): ``eval`` would compute it for minutes or
   run out of memory, hpc_es scores the answer 0 at once;
4. thousands of nested unary signs: Python's compiler gives up (its depth limit follows the interpreter's
   recursion limit and call depth), hpc_es computes them.

The generated answers keep powers small enough for ``eval`` to finish (checked on the syntax tree before
``eval`` is called) and unary chains short.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from hpc_es.tasks import countdown
from hpc_es.tasks.arith import MAX_POWER_BITS

# ------------------------------------------------------------------------------- the published rules, restated

_R_FULL = r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$"
_R_THINK = r"<think>.*?<\/think>"
_R_ANSWER = r"<answer>.*?<\/answer>"
_R_ANSWER_GROUP = r"<answer>(.*?)<\/answer>"
_R_CHARS = r"^[0-9+\-*/() ]+$"


class TooBig(Exception):
    """The answer holds a power that ``eval`` could not finish: the restatement declines to run it."""


def _int_bits(node: ast.AST) -> float | None:
    """An upper bound on the bit length of an int-valued subtree; None when it is a float (floats are fast).

    Raises TooBig where an int power could exceed ``4 * MAX_POWER_BITS`` bits."""
    if isinstance(node, ast.Expression):
        return _int_bits(node.body)
    if isinstance(node, ast.Constant):
        return float(node.value.bit_length()) if isinstance(node.value, int) else None
    if isinstance(node, ast.UnaryOp):
        return _int_bits(node.operand)
    if isinstance(node, ast.BinOp):
        a, b = _int_bits(node.left), _int_bits(node.right)
        if isinstance(node.op, ast.Div) or a is None or b is None:
            return None
        if isinstance(node.op, (ast.Add, ast.Sub)):
            return max(a, b) + 1
        if isinstance(node.op, ast.Mult):
            return a + b
        if isinstance(node.op, ast.FloorDiv):
            return a + 1
        if isinstance(node.op, ast.Pow):
            bits = float("inf") if b > 60 else a * 2.0 ** b
            if bits > 4 * MAX_POWER_BITS:  # checked where it arises: a float division above may hide it
                raise TooBig(ast.unparse(node)[:40])
            return bits
    raise AssertionError(f"unexpected node {type(node).__name__}")  # the allowed characters allow no other


def _guarded_eval(content: str) -> Any:
    """Python's eval as the published reward called it, after checking that no power can run away."""
    try:
        tree = ast.parse(content.strip(" \t"), mode="eval")  # eval() strips these too
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        tree = None  # eval fails on it too (and fast)
    if tree is not None:
        try:
            _int_bits(tree)
        except RecursionError:
            raise TooBig(content[:40]) from None
    return eval(content, {"__builtins__": None}, {})  # the test's own generated arithmetic, powers bounded


def ref_format(text: str) -> float:
    if re.match(_R_FULL, text, re.DOTALL):
        return 1.0
    return (0.1 if re.search(_R_THINK, text, re.DOTALL) else 0.0) + (
        0.5 if re.search(_R_ANSWER, text, re.DOTALL) else 0.0)


def ref_answer(completion: str, numbers: Sequence[int], target: Any) -> float:
    found = re.findall(_R_ANSWER_GROUP, completion, re.DOTALL)
    if not found:
        return 0.0
    content = found[-1]
    if not content or not re.match(_R_CHARS, content):
        return 0.0
    used = [int(n) for n in re.findall(r"\d+", content)]  # raises past 4,300 digits, as published
    if sorted(used) != sorted(numbers):
        return 0.0
    try:
        result = _guarded_eval(content)
        if abs(float(result) - float(target)) < 1e-5:
            return 1.0
    except TooBig:
        raise
    except Exception:  # noqa: BLE001 - the published rule: any error scores 0
        return 0.0
    return 0.0


def ref_score(completion: str, numbers: Sequence[int], target: Any) -> float:
    return ref_format("<think>" + completion) * 0.1 + ref_answer(completion, numbers, target)


# ------------------------------------------------------------------------------- generated completions

_WS = ["", "", "", " ", "  ", "\n", "\n\n", " \n", "\t", "\r\n"]
_WORDS = ["Let", "me", "try", "44 + 19 = 63", "so", "the answer is", "=", "98", "hmm", "(1 + 2) / 3", "ok."]


def _ws(rng: random.Random) -> str:
    return rng.choice(_WS)


def _expr(rng: random.Random, numbers: list[int]) -> str:
    """An expression over ``numbers`` (usually each once) with Python's arithmetic in odd shapes."""
    pool = list(numbers)
    roll = rng.random()
    if roll < 0.08:
        pool.append(rng.choice(numbers))  # a number reused
    elif roll < 0.16 and len(pool) > 1:
        pool.pop(rng.randrange(len(pool)))  # a number missing
    elif roll < 0.2:
        pool[rng.randrange(len(pool))] = rng.randint(100, 999)  # a number not given
    rng.shuffle(pool)
    parts = [str(n) for n in pool]
    while len(parts) > 1:
        i = rng.randrange(len(parts) - 1)
        op = rng.choice(["+", "-", "*", "/", "+", "-", "*", "/", "//", "**", "* *", "/ /", "***"])
        left, right_s = parts[i], parts[i + 1]
        if rng.random() < 0.15:
            right_s = "-" * rng.randint(1, 4) + right_s
        sp = rng.choice(["", " ", " ", "  "])
        joined = f"{left}{sp}{op}{sp}{right_s}"
        if rng.random() < 0.5:
            joined = f"({joined})"
        parts[i:i + 2] = [joined]
    out = parts[0]
    roll = rng.random()
    if roll < 0.05:
        depth = rng.choice([150, 199, 200, 201, 210])  # Python's tokenizer stops at 200
        out = "(" * depth + out + ")" * depth
    elif roll < 0.15:
        out = "(" * rng.randint(1, 6) + out + ")" * rng.randint(0, 7)  # sometimes unbalanced
    elif roll < 0.2:
        out = "-" * rng.randint(1, 30) + out
    elif roll < 0.23:
        out = out.replace(str(pool[0]), f"{pool[0]}.5", 1)  # a decimal
    elif roll < 0.26:
        out = out.replace(str(pool[0]), "0" + str(pool[0]), 1)  # a leading zero
    elif roll < 0.28:
        out = out + " = " + str(rng.randint(1, 99))
    elif roll < 0.3:
        out = out + " + " + "0" * rng.choice([5, 4300, 4301, 5000])  # huge literal: zeros keep its value 0
    elif roll < 0.32:
        out = out + " * 1" + "0" * rng.choice([300, 400])  # beyond float range
    return out


def _sprinkle(rng: random.Random, text: str) -> str:
    """Whitespace at random positions (spaces, newlines, tabs), including both ends."""
    if rng.random() < 0.5:
        return _ws(rng) + text + _ws(rng)
    chars = list(text)
    for _ in range(rng.randint(1, 3)):
        chars.insert(rng.randint(0, len(chars)), rng.choice(_WS[3:]))
    return "".join(chars)


def _answer_block(rng: random.Random, content: str) -> str:
    roll = rng.random()
    if roll < 0.05:
        return f"<answer><answer>{content}</answer></answer>"
    if roll < 0.1:
        return f"<answer>{content}"
    if roll < 0.13:
        return f"{content}</answer>"
    if roll < 0.16:
        return "<answer></answer>"
    if roll < 0.2:
        return f"<answer>{content}\n</answer>"  # the case that motivated this test
    return f"<answer>{content}</answer>"


def _think(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 6)))


def _target(rng: random.Random, value: float | None) -> Any:
    if value is None or rng.random() < 0.25:
        return rng.choice([98, "98", "-11", "27.4", 0, "0", 3.5, " 7 ", "1e2", "abc", "1_0", 12.000001])
    roll = rng.random()
    if value == int(value) and abs(value) < 1e15:
        if roll < 0.3:
            return str(int(value))
        if roll < 0.5:
            return int(value)
        if roll < 0.6:
            return f"{value:.1f}"
    if roll < 0.7:
        return repr(value)
    if roll < 0.8:
        return value + rng.choice([1e-6, -1e-6, 2e-5, 0.5])  # within and just outside 1e-5
    return value


def _case(rng: random.Random) -> tuple[str, list[int], Any]:
    numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
    content = _expr(rng, numbers)
    if rng.random() < 0.6:
        content = _sprinkle(rng, content) if rng.random() < 0.5 else content
    try:
        value: float | None = float(_guarded_eval(content.removesuffix("\n")))
    except Exception:  # noqa: BLE001 - no value: the target is drawn at random
        value = None
    think = _think(rng)
    shape = rng.random()
    if shape < 0.35:  # the canonical shape, maybe with a trailing newline or space
        text = f"{think}</think>\n{_answer_block(rng, content)}" + rng.choice(["", "", "\n", " ", "\n\n"])
    elif shape < 0.5:  # several answer blocks: only the last counts
        first = _answer_block(rng, _expr(rng, numbers))
        text = f"{think}</think>\n{first}{_ws(rng)}{_answer_block(rng, content)}{_ws(rng)}"
    elif shape < 0.6:  # extra or missing think tags
        text = rng.choice(["<think>", "", "</think>", "<think></think>"]) + f"{think}{_ws(rng)}" + rng.choice(
            ["</think>", "", "</think></think>"]) + _ws(rng) + _answer_block(rng, content)
    elif shape < 0.7:  # the prompt's <think> echoed, nested think blocks
        text = f"<think>{think}</think>{_ws(rng)}</think>\n{_answer_block(rng, content)}"
    elif shape < 0.8:  # no answer tags at all
        text = f"{think}</think>\n{content}"
    else:  # whitespace between every part
        text = _ws(rng) + think + _ws(rng) + "</think>" + _ws(rng) + _answer_block(rng, content) + _ws(rng)
    return text, numbers, _target(rng, value)


# ------------------------------------------------------------------------------- tests

def test_scorer_matches_the_published_rules_on_generated_completions() -> None:
    rng = random.Random(13)
    seen: Counter[Any] = Counter()
    for _ in range(12000):
        completion, numbers, target = _case(rng)
        ours = countdown.score(completion, numbers, target)
        try:
            want = ref_score(completion, numbers, target)
        except TooBig:
            seen["too big"] += 1
            continue
        except ValueError:  # difference 2: the published code raised; hpc_es scores the answer 0
            seen["crash"] += 1
            assert ours == 0.1 * ref_format("<think>" + completion), completion[:200]
            continue
        assert ours == want, (completion, numbers, target)
        seen[round(want, 2)] += 1
    # every value the reward can take was seen (a correct answer needs an answer pair, so format >= 0.5)
    for outcome in (0.0, 0.01, 0.05, 0.06, 0.1, 1.05, 1.06, 1.1):
        assert seen[outcome] >= 10, (outcome, seen)
    assert seen[1.1] > 500 and seen["crash"] > 20, seen
    assert seen["too big"] < 200, seen


def test_newline_before_closing_tag_gets_full_credit() -> None:
    text = "reasoning</think>\n<answer>44 + 19 + 35\n</answer>"
    assert countdown.score(text, [44, 19, 35], 98) == ref_score(text, [44, 19, 35], 98) == 1.1
    two = "reasoning</think>\n<answer>44 + 19 + 35\n\n</answer>"  # "$" lets one newline through, not two
    assert countdown.score(two, [44, 19, 35], 98) == ref_score(two, [44, 19, 35], 98) == 0.1
    assert countdown.score("x</think>\n<answer>44 + 19 + 35</answer>\n", [44, 19, 35], "98") == 1.1


def test_parentheses_nest_as_deep_as_python_allows() -> None:
    for depth, want in ((200, 1.1), (201, 0.1)):
        text = "r</think>\n<answer>" + "(" * depth + "44 + 19 + 35" + ")" * depth + "</answer>"
        assert countdown.score(text, [44, 19, 35], 98) == ref_score(text, [44, 19, 35], 98) == want


def test_kept_difference_huge_literal_scores_zero_instead_of_crashing() -> None:
    text = "r</think>\n<answer>44 + 19 + 35 + " + "0" * 4301 + "</answer>"
    try:
        ref_score(text, [44, 19, 35, 0], 98)
    except ValueError:
        pass
    else:  # pragma: no cover - a Python without the int-string limit
        raise AssertionError("the published rule no longer raises on long literals")
    assert countdown.score(text, [44, 19, 35, 0], 98) == 0.1


def test_kept_difference_runaway_power_scores_zero() -> None:
    # Python would spend seconds on 99 ** 970299 and then give 1 // it == 0 == the target
    text = "r</think>\n<answer>1 // 99 ** 99 ** 3</answer>"
    assert countdown.score(text, [1, 99, 99, 3], 0) == 0.1
    assert countdown.score("r</think>\n<answer>1 // 99 ** 99 ** 2</answer>", [1, 99, 99, 2], 0) == 1.1


def test_kept_difference_thousands_of_unary_signs_are_computed() -> None:
    text = "r</think>\n<answer>" + "-" * 6000 + "44 + 19 + 35</answer>"
    assert ref_score(text, [44, 19, 35], 98) == 0.1  # Python's compiler gives up
    assert countdown.score(text, [44, 19, 35], 98) == 1.1
