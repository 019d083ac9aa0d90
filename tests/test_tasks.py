"""Tasks: the Countdown reward (hand-computed values), prompts, data loading, synthetic sets, task loading."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hpc_es.config import Config
from hpc_es.errors import DataError, TaskError
from hpc_es.tasks import Example, Task, load_task, safe_score, split_examples
from hpc_es.tasks import conciseness, countdown
from hpc_es.tasks.arith import compute, integers_in

REPO = Path(__file__).resolve().parents[1]
N3 = [44, 19, 35]  # target 98 = 44 + 19 + 35

# --------------------------------------------------------------------------------------------- reward

# (completion, numbers, target, expected reward). Format is scored on "<think>" + completion:
# full shape 1.0 -> 0.1; else think pair 0.1 -> 0.01 and answer pair 0.5 -> 0.05 (both 0.06).
REWARD_CASES = [
    # perfect answers
    ("reasoning</think>\n<answer>44 + 19 + 35</answer>", N3, 98, 1.1),
    ("</think>\n<answer>(44 + 19) + 35</answer>", N3, 98, 1.1),
    ("r</think>\n<answer>35 + 44 + 19</answer>", N3, 98, 1.1),
    ("r</think>\n<answer>+44 + 19 + 35</answer>", N3, 98, 1.1),  # unary plus is valid Python
    ("r</think>\n<answer>  44+19+35  </answer>", N3, 98, 1.1),  # spaces are allowed characters
    ("r</think>\n<answer>44 + 19 + 35</answer>\n", N3, 98, 1.1),  # `$` matches before one final newline
    ("<think>x</think>\n<answer>44 + 19 + 35</answer>", N3, 98, 1.1),  # repeated opening tag is inside .*?
    ("r</think>\n<answer>2 * 3 * 4</answer>", [2, 3, 4], 24, 1.1),
    ("r</think>\n<answer>1 * 2 * 3 * 4</answer>", [1, 2, 3, 4], 24, 1.1),
    ("r</think>\n<answer>4 * (84 / 3)</answer>", [3, 4, 84], 112, 1.1),  # exact division
    # format-only: right shape, wrong or unusable answer
    ("r</think>\n<answer>44 + 19 - 35</answer>", N3, 98, 0.1),  # wrong value (28)
    ("r</think>\n<answer>44 + 19 + 36</answer>", N3, 98, 0.1),  # wrong number
    ("r</think>\n<answer>44 + 19 + 35 + 0</answer>", N3, 98, 0.1),  # extra number
    ("r</think>\n<answer>44 + 44 + 10</answer>", N3, 98, 0.1),  # reused number, value is 98
    ("r</think>\n<answer>44 + 19 + 35</answer>", [44, 19, 35, 2], 98, 0.1),  # a number left out
    ("r</think>\n<answer></answer>", N3, 98, 0.1),  # empty answer
    ("r</think>\n<answer> </answer>", N3, 98, 0.1),  # blank answer
    ("r</think>\n<answer>\n44 + 19 + 35\n</answer>", N3, 98, 0.1),  # newline is not an allowed character
    ("r</think>\n<answer>44 +\t19 + 35</answer>", N3, 98, 0.1),  # tab is not allowed
    ("r</think>\n<answer>7 / 2 * 1</answer>", [7, 2, 1], 3, 0.1),  # inexact division: 3.5
    ("r</think>\n<answer>3 / (5 - 5)</answer>", [5, 5, 3], 3, 0.1),  # division by zero
    ("r</think>\n<answer>3 ** 2 * 1</answer>", [3, 2, 1], 9, 1.1),  # power, as the paper's eval read it
    ("r</think>\n<answer>7 // 2 * 1</answer>", [7, 2, 1], 3, 1.1),  # floor division, likewise
    ("r</think>\n<answer>3 * * 2 * 1</answer>", [3, 2, 1], 9, 0.1),  # "* *" is no operator (Python: syntax error)
    ("r</think>\n<answer>44 + 19 + 35 = 98</answer>", N3, 98, 0.1),  # '='
    ("r</think>\n<answer>abs(44) + 19 + 35</answer>", N3, 98, 0.1),  # letters
    ("r</think>\n<answer>44.0 + 19 + 35</answer>", N3, 98, 0.1),  # decimal point
    ("r</think>\n<answer>\uff14\uff14 + 19 + 35</answer>", N3, 98, 0.1),  # full-width digits
    ("r</think>\n<answer>44 19 + 35</answer>", N3, 98, 0.1),  # syntax error
    ("r</think>\n<answer>(44 + 19 + 35</answer>", N3, 98, 0.1),  # unbalanced
    ("r</think>\n<answer>(44 + 19)(35)</answer>", N3, 98, 0.1),  # implicit call, not multiplication
    ("r</think>\n<answer>044 + 19 + 35</answer>", N3, 98, 0.1),  # leading zero: a SyntaxError in Python
    ("r</think>\n<answer>44 + 19 + 35</answer>", N3, "abc", 0.1),  # unusable target: error -> 0
    # the last answer counts
    ("r</think>\n<answer>1 + 2</answer>\n<answer>44 + 19 + 35</answer>", N3, 98, 1.1),
    ("r</think>\n<answer>44 + 19 + 35</answer>\n<answer>1 + 2</answer>", N3, 98, 0.1),
    # partial format
    ("r</think> <answer>44 + 19 + 35</answer>", N3, 98, 1.06),  # space instead of newline
    ("r</think>\n<answer>44 + 19 + 35</answer> done", N3, 98, 1.06),  # trailing text
    ("r</think>\n<answer>44 + 19 + 35</answer>\n\n", N3, 98, 1.06),  # two trailing newlines
    ("<answer>44 + 19 + 35</answer>", N3, 98, 1.05),  # no </think>
    ("<answer>44+19+35</answer></think>", N3, 98, 1.06),  # think pair spans the answer
    ("<answer>nope</answer>", N3, 98, 0.05),
    ("x</think><answer>1</answer>", N3, 98, 0.06),
    ("r</think>", N3, 98, 0.01),
    ("r</think>\n<answer>44 + 19 + 35", N3, 98, 0.01),  # unclosed answer
    ("r</think>\n<Answer>44 + 19 + 35</Answer>", N3, 98, 0.01),  # tags are case-sensitive
    ("r</think>\n<answer>44 + 19 + 35</answr>", N3, 98, 0.01),
    ("no tags at all", N3, 98, 0.0),
    ("", N3, 98, 0.0),
    ("44 + 19 + 35", N3, 98, 0.0),
    # targets: strings, floats, negatives, tolerance 1e-5
    ("r</think>\n<answer>44 + 19 + 35</answer>", N3, "98", 1.1),
    ("r</think>\n<answer>44 + 19 + 35</answer>", N3, " 98 ", 1.1),
    ("r</think>\n<answer>44 + 19 + 35</answer>", N3, "98.0", 1.1),
    ("r</think>\n<answer>44 + 19 + 35</answer>", N3, 98.000001, 1.1),
    ("r</think>\n<answer>44 + 19 + 35</answer>", N3, 98.0001, 0.1),
    ("r</think>\n<answer>1 / (4 - 2)</answer>", [1, 2, 4], 0.5, 1.1),
    ("r</think>\n<answer>(4 * 2) / 3</answer>", [2, 3, 4], "2.6666666", 1.1),  # within 1e-5
    ("r</think>\n<answer>(4 * 2) / 3</answer>", [2, 3, 4], "2.6666", 0.1),  # off by 6.7e-5
    ("r</think>\n<answer>19 - 44 - 35</answer>", N3, "-60", 1.1),
    ("r</think>\n<answer>19 - 44 - 35</answer>", N3, -60, 1.1),
    ("r</think>\n<answer>-(1 + 2 + 3)</answer>", [1, 2, 3], -6, 1.1),
    ("r</think>\n<answer>1 + 2 + 3</answer>", [1, 2, 3], -6, 0.1),
]


@pytest.mark.parametrize("completion,numbers,target,expected", REWARD_CASES)
def test_countdown_reward(completion, numbers, target, expected):
    assert countdown.score(completion, numbers, target) == pytest.approx(expected, abs=1e-12)


def test_reward_case_count():
    assert len(REWARD_CASES) >= 35


def test_format_score_parts():
    assert countdown.format_score("<think>a</think>\n<answer>b</answer>") == 1.0
    assert countdown.format_score("<think>a</think>") == pytest.approx(0.1)
    assert countdown.format_score("<answer>b</answer>") == pytest.approx(0.5)
    assert countdown.format_score("<think>a</think> <answer>b</answer>") == pytest.approx(0.6)
    assert countdown.format_score("plain") == 0.0


def test_reward_scores_completion_not_prompt():
    # The prompt's worked example "<answer> (1 + 2) / 3 </answer>" must not count: only the completion is scored.
    prompt = countdown.make_prompt([1, 2, 3], 1)
    assert countdown.score("thinking", [1, 2, 3], 1) == 0.0
    assert countdown.score(prompt + "thinking", [1, 2, 3], 1) > 1.0  # what the paper's bug would have given


def test_countdown_task_score_uses_info():
    ex = Example(prompt="p", info={"numbers": N3, "target": "98"})
    task = countdown.CountdownTask(_cfg(task="countdown", synthetic_size=4, train_size=2))
    assert task.score("r</think>\n<answer>44 + 19 + 35</answer>", ex) == pytest.approx(1.1)


# --------------------------------------------------------------------------------------------- arith

@pytest.mark.parametrize("expr,value", [
    ("1 + 2 * 3", 7.0), ("(1 + 2) * 3", 9.0), ("7 / 2", 3.5), ("8 - 3 - 2", 3.0), ("12 / 3 / 2", 2.0),
    ("-3", -3.0), ("2 * -3", -6.0), ("--3", 3.0), ("2 - -3", 5.0), ("00", 0.0), ("((5))", 5.0),
    (" 1+1 ", 2.0), ("2 ** 3", 8.0), ("2**3", 8.0), ("7 // 2", 3.0), ("2 ** -1", 0.5), ("-2 ** 2", -4.0),
    ("2 ** 3 ** 2", 512.0), ("(7 / 2) // 1", 3.0), ("(99 ** 99) / (99 ** 98)", 99.0), ("-7 // 2", -4.0),
])
def test_compute_values(expr, value):
    assert compute(expr) == value
    assert isinstance(compute(expr), float)


@pytest.mark.parametrize("expr", [
    "", "   ", "1 / 0", "1 / (2 - 2)", "2 * * 3", "7 / / 2", "7 // 0", "0 ** -1", "9 ** 9 ** 9",
    "(0 - 8) ** (1 / 3)", "2 ** 2 ** 2 ** 2 ** 2", "2 ***3", "1 2", "(1", "1)", "()", "a", "1.5", "07",
    "1 +", "* 2", "2 = 2", "__import__('os')", "(" * 3000 + "1" + ")" * 3000, "9" * 400 + " * " + "9" * 400,
])
def test_compute_rejects(expr):
    with pytest.raises(ValueError):
        compute(expr)


def _random_expr(rng: random.Random, depth: int = 0) -> str:
    if depth > 3 or rng.random() < 0.3:
        return str(rng.randint(0, 99))
    kind = rng.random()
    if kind < 0.15:
        return "-" + _random_expr(rng, depth + 1)
    if kind < 0.3:
        return "(" + _random_expr(rng, depth + 1) + ")"
    if kind < 0.4:  # small exponents: Python itself must finish
        return _random_expr(rng, depth + 1) + " ** " + rng.choice(["0", "1", "2", "3", "-1", "(1 / 2)"])
    op = rng.choice(["+", "-", "*", "/", "//"])
    return _random_expr(rng, depth + 1) + f" {op} " + _random_expr(rng, depth + 1)


def test_compute_agrees_with_python_on_random_expressions():
    """What the paper's reward computed with eval, the safe evaluator computes too (or both fail)."""
    rng = random.Random(7)
    agreed = failed = 0
    for _ in range(3000):
        expr = _random_expr(rng)
        try:
            want = eval(expr, {"__builtins__": {}})  # noqa: S307 (test-generated arithmetic only)
            if isinstance(want, complex) or not math.isfinite(float(want)):
                raise ArithmeticError
        except ArithmeticError:
            with pytest.raises(ValueError):
                compute(expr)
            failed += 1
            continue
        assert compute(expr) == float(want), expr
        agreed += 1
    assert agreed > 2000 and failed > 10  # both branches were exercised


def test_integers_in():
    assert integers_in("(44 + 19) * 035 - 2") == [44, 19, 35, 2]
    assert integers_in("no digits") == []


# --------------------------------------------------------------------------------------------- prompts

EXPECTED_PROMPT = (
    "You are a helpful assistant who first thinks about the reasoning process and then gives the user the answer."
    "Using the numbers [44 19 35], create an equation that equals 98."
    "You may use basic arithmetic operations (+, -, *, /) and each number only once."
    "Show your work in <think> </think> tags."
    "Return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    "Let me solve this step by step.\n<think>"
)


def test_make_prompt_exact():
    assert countdown.make_prompt([44, 19, 35], 98) == EXPECTED_PROMPT
    assert countdown.make_prompt([44, 19, 35], "98") == EXPECTED_PROMPT
    assert countdown.make_prompt([44, 19, 35], 98.0) == EXPECTED_PROMPT


def test_make_prompt_shape():
    p = countdown.make_prompt([8, 16, 56], 7)
    assert "Using the numbers [ 8 16 56], create an equation that equals 7." in p
    assert p.endswith("Let me solve this step by step.\n<think>")
    assert ". " not in p  # sentences joined without a space after the full stop
    assert "<answer> (1 + 2) / 3 </answer>" in p


@pytest.mark.parametrize("numbers,text", [
    ([8, 16, 56], "[ 8 16 56]"), ([44, 19, 35], "[44 19 35]"), ([1, 2, 3], "[1 2 3]"),
    ([5, 100, 7, 60], "[  5 100   7  60]"), ([9, 9, 10, 1], "[ 9  9 10  1]"),
])
def test_format_numbers_like_numpy(numbers, text):
    assert countdown.format_numbers(numbers) == text


def test_format_target():
    assert countdown.format_target(-2.5) == "-2.5"
    assert countdown.format_target("-12") == "-12"
    assert countdown.format_target(7) == "7"


# --------------------------------------------------------------------------------------------- JSON data

def _write(tmp_path: Path, data, name: str = "data.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def test_load_json_valid(tmp_path):
    path = _write(tmp_path, [
        {"id": 0, "numbers": [44, 19, 35], "target": "98", "solution": "((44 + 19) + 35)",
         "context": "VERBATIM  context\n<think>"},
        {"numbers": [8, 16, 56, 2], "target": 7},
    ])
    examples = countdown.load_json(path)
    assert examples[0].prompt == "VERBATIM  context\n<think>"
    assert examples[0].info["numbers"] == [44, 19, 35]
    assert examples[0].info["target"] == "98"
    assert examples[0].info["solution"] == "((44 + 19) + 35)"
    assert examples[1].prompt == countdown.make_prompt([8, 16, 56, 2], 7)
    assert countdown.score("x</think>\n<answer>44 + 19 + 35</answer>", **{
        k: examples[0].info[k] for k in ("numbers", "target")}) == pytest.approx(1.1)


@pytest.mark.parametrize("data,needle", [
    ("[{\"numbers\": [1, 2, 3], ", "not valid JSON"),
    ({"numbers": [1, 2, 3], "target": 6}, "JSON list"),
    ([], "empty"),
    ([{"numbers": [1, 2, 3], "target": 6}, {"numbers": [1, 2, 3]}], "item 1 has no 'target'"),
    ([{"target": 6}], "item 0 has no 'numbers'"),
    ([[1, 2, 3]], "item 0 is a list"),
    ([{"numbers": "1 2 3", "target": 6}], "item 0: 'numbers' must be a list of integers"),
    ([{"numbers": [1, 2.5, 3], "target": 6}], "item 0: 'numbers' must be a list of integers"),
    ([{"numbers": [1, True, 3], "target": 6}], "item 0: 'numbers' must be a list of integers"),
    ([{"numbers": [1, 2], "target": 3}], "3 or 4 integers"),
    ([{"numbers": [1, 2, 3, 4, 5], "target": 3}], "3 or 4 integers"),
    ([{"numbers": [1, -2, 3], "target": 3}], "non-negative"),
    ([{"numbers": [1, 2, 3], "target": "six"}], "'target' 'six' is not a number"),
    ([{"numbers": [1, 2, 3], "target": None}], "'target' must be a number"),
    ([{"numbers": [1, 2, 3], "target": True}], "'target' must be a number"),
    ([{"numbers": [1, 2, 3], "target": "nan"}], "not finite"),
    ([{"numbers": [1, 2, 3], "target": 6, "context": 5}], "'context' must be a non-empty string"),
])
def test_load_json_malformed(tmp_path, data, needle):
    path = _write(tmp_path, data)
    with pytest.raises(DataError) as e:
        countdown.load_json(path)
    assert needle in str(e.value)
    assert path in str(e.value)


def test_load_json_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        countdown.load_json(str(tmp_path / "nope.json"))


# --------------------------------------------------------------------------------------------- synthetic

def test_synthetic_solvable_and_in_range():
    items = countdown.synthetic(300, seed=7)
    assert len(items) == 300
    assert {len(e.info["numbers"]) for e in items} == {3, 4}
    for e in items:
        nums, target, solution = e.info["numbers"], e.info["target"], e.info["solution"]
        assert all(1 <= n <= 99 for n in nums)
        assert isinstance(target, int) and target >= 1
        assert sorted(integers_in(solution)) == sorted(nums)
        assert compute(solution) == target
        assert countdown.score(f"x</think>\n<answer>{solution}</answer>", nums, target) == pytest.approx(1.1)
        assert e.prompt == countdown.make_prompt(nums, target)


def test_synthetic_uses_division_sometimes():
    assert any("/" in e.info["solution"] for e in countdown.synthetic(300, seed=1))


def test_synthetic_deterministic_without_global_rng():
    random.seed(123)
    state = random.getstate()
    a = countdown.synthetic(50, seed=3)
    assert random.getstate() == state  # the global RNG is neither used nor disturbed
    random.seed(999)
    b = countdown.synthetic(50, seed=3)
    assert a == b
    assert countdown.synthetic(50, seed=4) != a


# --------------------------------------------------------------------------------------------- task splits

def _cfg(task: str = "countdown", path: str = "", train_size: int = 200, test_size: int = 0,
         synthetic_size: int = 1200, seed: int = 0) -> Config:
    cfg = Config()
    cfg.task = task
    cfg.seed = seed
    cfg.data.path = path
    cfg.data.train_size = train_size
    cfg.data.test_size = test_size
    cfg.data.synthetic_size = synthetic_size
    return cfg


def _countdown_file(tmp_path: Path, n: int) -> str:
    return _write(tmp_path, [{"numbers": [i + 1, 2, 3], "target": str(i)} for i in range(n)])


def test_countdown_task_from_file_splits(tmp_path):
    path = _countdown_file(tmp_path, 10)
    task = countdown.CountdownTask(_cfg(path=path, train_size=3))
    assert [e.info["target"] for e in task.train_examples()] == ["0", "1", "2"]
    assert [e.info["target"] for e in task.test_examples()] == [str(i) for i in range(3, 10)]
    task = countdown.CountdownTask(_cfg(path=path, train_size=3, test_size=2))
    assert [e.info["target"] for e in task.test_examples()] == ["3", "4"]
    assert isinstance(task, Task)


@pytest.mark.parametrize("train_size,test_size", [(10, 0), (11, 0), (8, 3)])
def test_countdown_task_too_few_items(tmp_path, train_size, test_size):
    path = _countdown_file(tmp_path, 10)
    with pytest.raises(DataError, match="has 10 items, too few") as e:
        countdown.CountdownTask(_cfg(path=path, train_size=train_size, test_size=test_size))
    assert path in str(e.value)


def test_countdown_task_synthetic_default():
    task = countdown.CountdownTask(_cfg(seed=5))
    assert len(task.train_examples()) == 200
    assert len(task.test_examples()) == 1000
    assert task.train_examples()[0] == countdown.synthetic(1, seed=5)[0]
    with pytest.raises(DataError, match="synthetic_size=50"):
        countdown.CountdownTask(_cfg(synthetic_size=50))


def test_split_examples_is_ordered():
    items = [Example(prompt=str(i)) for i in range(6)]
    train, test = split_examples(items, 2, 3, "x")
    assert [e.prompt for e in train] == ["0", "1"]
    assert [e.prompt for e in test] == ["2", "3", "4"]


# --------------------------------------------------------------------------------------------- conciseness

@pytest.mark.parametrize("completion,reference,expected", [
    ("abcd", "abcd", 0.0), ("abc", "abcd", -1.0), ("", "x", -1.0), ("hello world", "hi", -9.0),
    ("7", "7", 0.0), ("", "", 0.0), ("é", "e", 0.0),  # characters, not bytes
])
def test_conciseness_reward(completion, reference, expected):
    assert conciseness.score(completion, reference) == expected
    ex = Example(prompt="q", info={"reference": reference})
    task = conciseness.ConcisenessTask(_cfg(task="conciseness", synthetic_size=4, train_size=2))
    assert task.score(completion, ex) == expected


def test_conciseness_load_json(tmp_path):
    path = _write(tmp_path, [{"prompt": "Q: hi\nA:", "reference": "hello"},
                             {"question": "What is 2+2?", "answer": "4"}])
    examples = conciseness.load_json(path)
    assert examples[0].prompt == "Q: hi\nA:" and examples[0].info["reference"] == "hello"
    assert examples[1].prompt == "What is 2+2?" and examples[1].info["reference"] == "4"


@pytest.mark.parametrize("data,needle", [
    ("{oops", "not valid JSON"),
    ([{"prompt": "a"}], "item 0 has neither 'reference' nor 'answer'"),
    ([{"prompt": "a", "reference": "b"}, {"reference": "b"}], "item 1 has neither 'prompt' nor 'question'"),
    ([{"prompt": "a", "reference": 3}], "item 0: 'reference' must be a string"),
    ([{"prompt": "", "reference": "x"}], "item 0: the prompt is empty"),
    (["just a string"], "item 0 is a str"),
])
def test_conciseness_load_json_malformed(tmp_path, data, needle):
    path = _write(tmp_path, data)
    with pytest.raises(DataError) as e:
        conciseness.load_json(path)
    assert needle in str(e.value) and path in str(e.value)


def test_conciseness_synthetic():
    items = conciseness.synthetic(2000, seed=0)
    assert items == conciseness.synthetic(2000, seed=0)
    assert items != conciseness.synthetic(2000, seed=1)
    assert all(len(e.prompt) < 60 for e in items)
    refs = [e.info["reference"] for e in items]
    assert all(1 <= len(r) <= 12 for r in refs)
    assert len({len(r) for r in refs}) >= 8  # varied target lengths
    assert len(set(e.prompt for e in items)) >= 200
    add = [e for e in items if " plus " in e.prompt]
    assert add and all(
        str(sum(int(t) for t in e.prompt[len("Q: what is "):-len("?\nA:")].split(" plus "))) == e.info["reference"]
        for e in add)


def test_conciseness_task_from_file(tmp_path):
    path = _write(tmp_path, [{"prompt": f"p{i}", "reference": "r"} for i in range(5)])
    task = conciseness.ConcisenessTask(_cfg(task="conciseness", path=path, train_size=2, test_size=2))
    assert [e.prompt for e in task.train_examples()] == ["p0", "p1"]
    assert [e.prompt for e in task.test_examples()] == ["p2", "p3"]


# --------------------------------------------------------------------------------------------- load_task

def test_load_task_builtins():
    t = load_task(_cfg(task="countdown"))
    assert t.name == "countdown" and isinstance(t, countdown.CountdownTask)
    t = load_task(_cfg(task="conciseness"))
    assert t.name == "conciseness" and isinstance(t, conciseness.ConcisenessTask)
    assert len(t.train_examples()) == 200


USER_MODULE = '''
from hpc_es.tasks import Example

class Echo:
    name = "echo"
    def __init__(self, n=3):
        self.items = [Example(prompt=f"say {i}", info={"i": i}) for i in range(n)]
    def train_examples(self):
        return self.items[:2]
    def test_examples(self):
        return self.items[2:]
    def score(self, completion, example):
        return float(str(example.info["i"]) in completion)

task = Echo()

def make(cfg):
    return Echo(n=cfg.seed + 3)

class NoScore:
    name = "noscore"
    def train_examples(self):
        return []
    def test_examples(self):
        return []

broken = NoScore()

def explode(cfg):
    raise RuntimeError("factory blew up")

def empty(cfg):
    class E(Echo):
        def train_examples(self):
            return []
    return E()

not_a_task = 42
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A fresh, uniquely named module in a temporary working directory."""
    name = f"user_task_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def test_load_task_module_object(user_module):
    t = load_task(_cfg(task=f"{user_module}:task"))
    assert t.name == "echo" and len(t.train_examples()) == 2
    assert safe_score(t, "say 1", t.train_examples()[1]) == 1.0


def test_load_task_module_factory(user_module):
    t = load_task(_cfg(task=f"{user_module}:make", seed=2))
    assert len(t.test_examples()) == 3  # n = seed + 3 = 5, train 2


def test_load_task_class_is_called_with_cfg(user_module):
    with pytest.raises(TaskError, match="calling Echo"):  # Echo(cfg) -> n=cfg -> range(cfg) fails
        load_task(_cfg(task=f"{user_module}:Echo"))
    t = load_task(_cfg(task="hpc_es.tasks.countdown:CountdownTask"))
    assert t.name == "countdown"


def test_load_task_file_path(tmp_path):
    path = tmp_path / "sub" / "mytask.py"
    path.parent.mkdir()
    path.write_text(USER_MODULE, encoding="utf-8")
    t = load_task(_cfg(task=f"{path}:task"))
    assert t.name == "echo"
    t = load_task(_cfg(task=f"{path}:make", seed=0))
    assert len(t.test_examples()) == 1


def test_example_user_task_loads(monkeypatch):
    monkeypatch.chdir(REPO)
    for spec in ("configs/examples/my_task.py:task", "configs/examples/my_task.py:make_task"):
        t = load_task(_cfg(task=spec))
        assert t.name == "keyword"
        ex = t.train_examples()[0]
        assert safe_score(t, "banana", ex) > 1.0 > safe_score(t, "apple", ex) >= 0.0


@pytest.mark.parametrize("attr,needle", [
    ("broken", "missing score"),
    ("not_a_task", "missing name (a non-empty string), train_examples, test_examples, score"),
    ("explode", "RuntimeError: factory blew up"),
    ("empty", "train_examples() returned no examples"),
    ("nothing_here", "has no attribute 'nothing_here'"),
])
def test_load_task_bad_attrs(user_module, attr, needle):
    with pytest.raises(TaskError) as e:
        load_task(_cfg(task=f"{user_module}:{attr}"))
    assert needle in str(e.value)


@pytest.mark.parametrize("spec", ["countdwn", "", "mod:", ":attr", "mod:not-an-identifier"])
def test_load_task_unknown_spec(spec):
    with pytest.raises(TaskError) as e:
        load_task(_cfg(task=spec))
    msg = str(e.value)
    assert "countdown" in msg and "conciseness" in msg and "module:attr" in msg


def test_load_task_missing_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(TaskError, match="task module 'no_such_module_xyz' not found"):
        load_task(_cfg(task="no_such_module_xyz:task"))


def test_load_task_missing_file(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        load_task(_cfg(task=f"{tmp_path}/missing.py:task"))


@pytest.mark.parametrize("source,needle", [
    ("import definitely_not_installed_pkg_xyz\n",
     "ModuleNotFoundError: No module named 'definitely_not_installed_pkg_xyz'"),
    ("raise ValueError('bad config\\nsecond line')\n", "ValueError: bad config"),
    ("def broken(:\n", "SyntaxError"),
])
def test_load_task_import_errors(tmp_path, monkeypatch, source, needle):
    name = f"bad_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for spec in (f"{name}:task", f"{tmp_path / name}.py:task"):
        with pytest.raises(TaskError) as e:
            load_task(_cfg(task=spec))
        msg = str(e.value)
        assert needle in msg and name in msg and "second line" not in msg


# --------------------------------------------------------------------------------------------- safe_score

class _Reward:
    name = "custom"

    def __init__(self, fn):
        self.fn = fn

    def train_examples(self):
        return [Example(prompt="P" * 100)]

    def test_examples(self):
        return []

    def score(self, completion, example):
        return self.fn(completion)


def _boom(_):
    raise KeyError("missing_field")


@pytest.mark.parametrize("fn,needle", [
    (_boom, "raised KeyError: 'missing_field'"),
    (lambda _: float("nan"), "non-finite value nan"),
    (lambda _: float("inf"), "non-finite value inf"),
    (lambda _: "1.0", "returned '1.0' (str), not a number"),
    (lambda _: None, "returned None"),
])
def test_safe_score_errors(fn, needle):
    task = _Reward(fn)
    with pytest.raises(TaskError) as e:
        safe_score(task, "c", task.train_examples()[0])
    msg = str(e.value)
    assert needle in msg and "task 'custom'" in msg
    assert repr("P" * 60) in msg and "P" * 61 not in msg


def test_safe_score_values():
    task = _Reward(lambda c: len(c))
    out = safe_score(task, "abc", task.train_examples()[0])
    assert out == 3.0 and type(out) is float
    assert safe_score(_Reward(lambda _: True), "", Example(prompt="p")) == 1.0


@pytest.mark.integration
def test_tasks_import_without_torch():
    code = ("import sys, hpc_es.tasks, hpc_es.tasks.countdown, hpc_es.tasks.conciseness; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_conciseness_paper_data_is_table_4_for_training_and_table_5_for_evaluation() -> None:
    from hpc_es.config import load_config
    from hpc_es.tasks import load_task

    task = load_task(load_config(overrides=["task=conciseness", "data.path=paper", "data.train_size=1"]))
    assert [(e.prompt, e.info["reference"]) for e in task.train_examples()] == [
        ("Solve: 3 + 5 =", "8"), ("If all birds can fly and penguins are birds, can penguins fly?", "No")]
    test = [(e.prompt, e.info["reference"]) for e in task.test_examples()]
    assert len(test) == 8 and test[1] == ("Calculate: 12 × 7 =", "84")
    assert test[4] == ("Translate “Hello” to Spanish:", "Hola") and test[-1] == ("How many days are in a week?", "7")
    assert task.score("Paris.", task.test_examples()[0]) == -1.0
