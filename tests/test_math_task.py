"""task=math: the answer table a MATH grader would pass, the last-box rule, data files, the built-in sample,
the reward time limit on a pathological answer, and a tiny run with eval."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

from conftest import TINY, ledger_arrays, run_hpc_es
from test_prompts import chat_model_dir  # noqa: F401  (a fixture: the tiny model with a ChatML template)
from hpc_es.cli import main
from hpc_es.config import load_config
from hpc_es.errors import DataError, TaskError
from hpc_es.tasks import Example, load_task, safe_score
from hpc_es.tasks import mathqa
from hpc_es.tasks.mathqa import MathTask, last_boxed
from hpc_es.tasks.symbolic import grader

# (reference, answer, equivalent): what a grader of MATH answers says
PAIRS = [
    # fractions
    (r"\frac{1}{2}", "0.5", True), (r"\frac{1}{2}", "1/2", True), (r"\frac{1}{2}", r"\frac{2}{4}", True),
    (r"\frac{1}{2}", r"\frac{1}{3}", False), (r"\frac{3}{4}", r"\dfrac{3}{4}", True),
    (r"\dfrac{3}{4}", r"\tfrac34", True), (r"\frac{7}{8}", "0.875", True), (r"\frac{1}{3}", "0.33", False),
    (r"-\frac{1}{2}", r"\frac{-1}{2}", True), (r"\frac{1}{2}", r"-\frac{1}{2}", False),
    (r"\frac{5}{2}", r"2\frac{1}{2}", True),
    # decimals
    ("0.3", r"\frac{3}{10}", True), ("0.3", "0.30", True), ("3", "3.0", True), ("3", "3.01", False),
    ("2.5", r"\frac{5}{2}", True), ("0.1", "0.01", False), ("0.3", ".3", True), ("0.5", "5", False),
    (r"\frac{3}{8}", "0.38", False),
    # percentages
    (r"35\%", "35", True), (r"35\%", "0.35", True), (r"35\%", r"35 \%", True), (r"10\%", "0.1", True),
    (r"35\%", r"36\%", False), (r"50\%", r"\frac{1}{2}", True), (r"25\%", "25.5", False),
    # units and \text{} wrappers
    (r"\text{Thursday}", r"\text{Thursday}", True), (r"\text{Thursday}", "Thursday", True),
    (r"\text{Thursday}", r"\text{Friday}", False), ("60", r"60\text{ km/h}", True),
    (r"9\pi", r"9\pi\text{ square units}", True), ("13", r"13 \text{ cm}", True), ("13", r"14\text{ cm}", False),
    ("30", r"\$30", True), ("30", r"30 \text{ dollars}", True), ("90", r"90^\circ", True),
    # intervals
    ("(-3, 3)", "(-3,3)", True), ("(-3, 3)", "[-3,3]", False), ("[-3, 5]", "[-3,5]", True),
    ("[-3, 5]", "[-3, 5)", False), (r"(-\infty, 2]", r"(-\infty,2]", True), (r"(-\infty, 2]", r"(-\infty, 2)", False),
    (r"(1,2)\cup(3,4)", r"(3,4)\cup(1,2)", True),
    # tuples
    ("(5, -1)", "(5,-1)", True), ("(7, 3)", "(3, 7)", False), ("(1, 2, 3)", "(1,2,3)", True),
    ("(1, 2, 3)", "(1, 2)", False), (r"(\frac{1}{2}, 3)", "(0.5, 3)", True),
    # sets, and lists of solutions
    (r"\{2, 3, 5, 7, 11\}", r"\{11, 7, 5, 3, 2\}", True), (r"\{2, 3, 5, 7, 11\}", r"\{2, 3, 5, 7\}", False),
    (r"\{1, 2\}", r"\{1, 3\}", False), ("2, 3", "3, 2", True), ("2, 3", "2", False), ("2, 3", "x = 2, 3", True),
    # thousands separators
    ("12,600", "12600", True), ("12600", "12{,}600", True), ("86400", "86,400", True),
    ("1,234,567", "1234567", True), ("1,000", "100", False), ("12,600", "12,500", False),
    # expressions
    (r"5\sqrt{2}", r"\sqrt{50}", True), ("(x - 3)(x + 3)", "x^2-9", True), ("3x^2", "3x^{2}", True),
    ("3x^2", "3x^3", False), (r"\sqrt{2}", r"\frac{2}{\sqrt{2}}", True), (r"\frac{5}{2}", r"x = \frac{5}{2}", True),
    ("-1", "-1.0", True), (r"9\pi", "28.27", False), ("1024", "2^{10}", True), ("6", r"\log_2 64", True),
    ("15", r"\dbinom{6}{2}", True),
]


def test_the_table_is_large_and_mixed() -> None:
    assert len(PAIRS) >= 60 and 20 <= sum(not eq for _, _, eq in PAIRS) <= len(PAIRS) - 20


@pytest.mark.parametrize("reference, answer, equivalent", PAIRS)
def test_answers_grade_as_a_math_grader_would(reference: str, answer: str, equivalent: bool) -> None:
    # an earlier box with the other verdict: only the last one counts
    decoy = r"\boxed{-12345}" if equivalent else rf"\boxed{{{reference}}}"
    completion = f"First {decoy}, then after checking, the answer is $\\boxed{{{answer}}}$."
    assert mathqa.score(completion, reference) == (1.0 if equivalent else 0.0)
    assert mathqa.is_correct(completion, reference) is equivalent


# --------------------------------------------------------------------------------------------- the last box

@pytest.mark.parametrize("text, content", [
    (r"\boxed{5}", "5"),
    (r"a \boxed{1} b \boxed{2} c", "2"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # \{ \} are literal braces
    (r"\boxed {7}", "7"),
    (r"\boxed{a_{b_{c}}} and more", "a_{b_{c}}"),
    (r"\boxed{}", ""),
    (r"\boxed{1} then \boxed{2", None),  # the last box never closes: no answer, even with a closed one before
    (r"\boxed{\}", None),  # an escaped brace closes nothing
    (r"\boxed 5", None),
    ("no box at all", None),
    (r"\boxed{1}}", "1"),  # a stray closing brace after the box is outside it
])
def test_last_boxed(text: str, content: str | None) -> None:
    assert last_boxed(text) == content


@pytest.mark.parametrize("completion", [r"\boxed{1} then \boxed{2", r"\boxed{}", r"\boxed{  }", "42", r"\boxed{{{"])
def test_unbalanced_empty_or_missing_boxes_score_0_without_an_error(completion: str) -> None:
    assert mathqa.score(completion, "2") == 0.0 and mathqa.score(completion, "2", 0.1) == 0.0


def test_the_format_term_pays_for_any_boxed_answer(tmp_path: Path) -> None:
    task = load_task(load_config(None, ["task=hpc_es.tasks.mathqa:with_format"]))
    ex = Example("p", {"reference": "7"})
    assert (task.score(r"\boxed{7}", ex), task.score(r"\boxed{8}", ex), task.score("7", ex)) == (1.1, 0.1, 0.0)
    assert task.is_correct(r"\boxed{7}", ex) and not task.is_correct(r"\boxed{8}", ex)
    plain = load_task(load_config(None, ["task=math"]))
    assert (plain.score(r"\boxed{7}", ex), plain.score(r"\boxed{8}", ex)) == (1.0, 0.0)


# --------------------------------------------------------------------------------------------- data

def _load(tmp_path: Path, name: str, text: str) -> list[Example]:
    path = tmp_path / name
    path.write_text(text)
    return mathqa.load_json(str(path))


def test_json_and_jsonl_files_with_either_key_spelling(tmp_path: Path) -> None:
    items = [{"problem": "What is 1+1?", "answer": "2"},
             {"question": "Half of 1?", "answer": r"$\frac{1}{2}$"},  # surrounding $ are dropped
             {"problem": "P3", "solution": r"So \boxed{3} ... no, \boxed{\frac{7}{2}}.", "level": 3},
             {"question": "Apples?", "answer": "She has 3 + 4 = 7.\n#### 1,007"},  # GSM8K
             {"problem": "P5", "answer": 12, "solution": r"\boxed{99}"}]  # a number; 'answer' wins
    from_json = _load(tmp_path, "d.json", json.dumps(items))
    from_jsonl = _load(tmp_path, "d.jsonl", "\n".join(json.dumps(i) for i in items) + "\n\n")
    assert from_json == from_jsonl
    assert [e.info["reference"] for e in from_json] == ["2", r"\frac{1}{2}", r"\frac{7}{2}", "1,007", "12"]
    assert from_json[0].prompt == "What is 1+1?\n" + mathqa.INSTRUCTION + "\n"
    assert from_json[1].info == {"problem": "Half of 1?", "reference": r"\frac{1}{2}", "index": 1}


@pytest.mark.parametrize("name, text, message", [
    ("d.jsonl", '{"problem": "a", "answer": "1"}\n{"problem": \n', "line 2 is not valid JSON"),
    ("d.jsonl", "\n\n", "holds no items"),
    ("d.json", '[{"problem": "a"}]', "item 0 has neither 'answer' nor 'solution' (keys: problem)"),
    ("d.json", '[{"answer": "1"}]', "item 0 has neither 'problem' nor 'question' (keys: answer)"),
    ("d.json", '[{"problem": "a", "solution": "no box"}]', "item 0: 'solution' has no \\boxed{...} answer"),
    ("d.json", '[{"problem": "a", "answer": " "}]', "item 0: the answer is empty"),
    ("d.json", '[{"problem": "", "answer": "1"}]', "item 0: the problem is empty"),
    ("d.json", '[{"problem": "a", "answer": [1]}]', "item 0: 'answer' must be a string, got list"),
    ("d.json", '["a"]', "item 0 is a str, expected an object with 'problem' and 'answer'"),
])
def test_bad_data_files_are_one_clear_error(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(DataError) as e:
        _load(tmp_path, name, text)
    assert message in str(e.value) and str(tmp_path / name) in str(e.value)


def test_the_built_in_sample_and_its_split() -> None:
    task = load_task(load_config(None, ["task=math"]))
    assert isinstance(task, MathTask) and task.name == "math"
    train, test = task.train_examples(), task.test_examples()
    assert (len(train), len(test)) == (32, 16)  # data.train_size=32, the rest test
    sample = train + test
    assert len({e.info["problem"] for e in sample}) == 48
    # every reference is readable and equals itself, so a right answer can score
    assert all(task.score(rf"\boxed{{{e.info['reference']}}}", e) == 1.0 for e in sample)
    assert task.default_system == mathqa.INSTRUCTION and r"\boxed{}" in task.default_system
    with pytest.raises(DataError, match=r"the built-in math sample \(48 problems\) has 48 items, too few"):
        load_task(load_config(None, ["task=math", "data.train_size=48"]))


# --------------------------------------------------------------------------------------------- time limit

PATHOLOGICAL = r"It is \boxed{9^{9^{9^{9}}}}"  # sympy computes the power in one C call that holds the GIL


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_a_pathological_answer_is_stopped_by_the_reward_time_limit(where: str) -> None:
    task = load_task(load_config(None, ["task=math"]))
    ex = task.test_examples()[0]
    got: dict[str, object] = {}

    def call() -> None:
        t0 = time.monotonic()
        try:
            safe_score(task, PATHOLOGICAL, ex, 1.0)
        except TaskError as e:
            got["message"], got["seconds"] = str(e), time.monotonic() - t0
        got["after"] = safe_score(task, rf"\boxed{{{ex.info['reference']}}}", ex, 60.0)  # a fresh grader

    if where == "main thread":
        call()
    else:
        t = threading.Thread(target=call)
        t.start()
        t.join(120)
    assert got["message"] == (f"task 'math' reward did not return within 1 s on prompt {ex.prompt[:60]!r} "
                              "(rollout.reward_timeout_s)")
    assert got["seconds"] < 10 and got["after"] == 1.0  # type: ignore[operator]


def test_a_run_that_meets_a_pathological_answer_stops_with_one_line(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "patho_task.py"
    f.write_text("from hpc_es.tasks.mathqa import MathTask\n\n"
                 "class T(MathTask):\n"
                 "    def score(self, completion, example):\n"
                 f"        return super().score({PATHOLOGICAL!r}, example)\n")
    t0 = time.monotonic()
    code = main(TINY + [f"task={f}:T", "data.train_size=4", "rollout.reward_timeout_s=2",
                        f"run_dir={tmp_path / 'r'}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hpc_es: error:")]
    assert code == 2 and time.monotonic() - t0 < 120
    assert len(err) == 1 and err[0].startswith("hpc_es: error: task 'math' reward did not return within 2 s on "
                                               "prompt 'What is $\\\\frac{3}{4} + \\\\frac{1}{8}$? Give the")
    assert not (tmp_path / "r" / "log.h5").exists()


def test_a_closed_grader_restarts_on_the_next_call() -> None:
    g = grader()
    assert g.equivalent("2", "2.0")
    g.close()  # e.g. after a time limit: the next call starts a new child
    assert g.equivalent(r"\frac{1}{4}", "0.25") and not g.equivalent("1", "2")


# --------------------------------------------------------------------------------------------- runs

SMALL = ["task=math", "model=tiny", "es.population_size=4", "rollout.prompts_per_iteration=2",
         "rollout.max_new_tokens=4", "threads=1", "progress=false"]


@pytest.mark.integration
def test_python_m_hpc_es_task_math_runs_on_the_sample_and_eval_prints_accuracy(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_hpc_es(SMALL + ["es.iterations=2", "eval.every=2", "eval.limit=3", f"run_dir={run_dir}"], check=True)
    ledger = ledger_arrays(run_dir)
    assert len(ledger["reward_mean"]) == 2
    assert math.isnan(ledger["eval_accuracy"][0]) and ledger["eval_accuracy"][1] == 0.0  # a random tiny model
    proc = run_hpc_es(["eval"] + SMALL + ["eval.limit=3", f"model={run_dir / 'final'}"], check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["task"] == "math" and out["examples"] == 3 and out["accuracy"] == 0.0 and out["mean_reward"] == 0.0


def test_the_shipped_math_config_has_the_seed_authors_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPC_ES_MODELS", "/models")
    monkeypatch.setenv("HPC_ES_DATA", "/data")
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "math_qwen2.5-math-7b.yaml"))
    assert (cfg.task, cfg.model, cfg.data.path) == ("math", "/models/Qwen2.5-Math-7B", "/data/math_train.jsonl")
    assert (cfg.es.population_size, cfg.es.sigma, cfg.es.alpha) == (30, 1e-3, 1e-3 / 2)
    assert cfg.rollout.max_new_tokens >= 2048 and cfg.rollout.repetition_penalty == "model"
    assert cfg.prompt.chat and not cfg.prompt.system  # the task's default_system, which asks for \boxed{}


def test_without_math_verify_the_task_fails_at_start_with_one_line(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from hpc_es.tasks.symbolic import Grader

    shadow = tmp_path / "math_verify"  # found first on the child's path, as if the package were not installed
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'math_verify'\")\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with pytest.raises(TaskError) as e:
        Grader().start()
    assert str(e.value) == ("the math grader did not start: cannot import math-verify: ModuleNotFoundError: No "
                            "module named 'math_verify' (task 'math' needs the math-verify package: pip install "
                            "math-verify)")


# --------------------------------------------------------------------------------------------- chat template

def test_prompts_raw_and_under_a_chat_template(request: pytest.FixtureRequest) -> None:
    from transformers import AutoTokenizer

    from hpc_es.prompts import prompt_format

    tok = AutoTokenizer.from_pretrained(request.getfixturevalue("chat_model_dir"))

    def first_prompt(*overrides: str) -> str:
        cfg = load_config(None, ["task=math", *overrides])
        task = load_task(cfg)
        return prompt_format(cfg, task).examples(tok, task.train_examples())[0].prompt

    problem = r"What is $\frac{3}{4} + \frac{1}{8}$? Give the answer as a fraction in lowest terms."
    assert first_prompt() == f"{problem}\n{mathqa.INSTRUCTION}\n"  # no template needed
    # the task's system message asks for the box; the user turn is the problem alone
    assert first_prompt("prompt.chat=true") == (f"<|im_start|>system\n{mathqa.INSTRUCTION}<|im_end|>\n"
                                                f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n")
    # a system message of the user's own: the instruction stays with the problem
    assert first_prompt("prompt.chat=true", "prompt.system=Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{problem}\n{mathqa.INSTRUCTION}\n<|im_end|>\n<|im_start|>assistant\n")


def test_a_chat_run_records_the_system_message_and_eval_reports_accuracy(request: pytest.FixtureRequest,
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    model = request.getfixturevalue("chat_model_dir")
    run_dir = tmp_path / "r"
    chat = ["task=math", "prompt.chat=true", "data.train_size=4", "eval.limit=2"]
    assert main(TINY + chat + ["es.iterations=1", f"model={model}", f"run_dir={run_dir}"]) == 0
    attrs = ledger_arrays(run_dir)["attrs"]
    assert bool(attrs["prompt_chat"]) and attrs["prompt_system"] == mathqa.INSTRUCTION
    capsys.readouterr()
    assert main(["eval"] + TINY + chat + [f"model={run_dir / 'final'}"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["prompt_chat"], out["prompt_system"], out["examples"]) == (True, mathqa.INSTRUCTION, 2)
    assert out["accuracy"] == 0.0 and out["mean_reward"] == 0.0  # a random tiny model boxes nothing
    # sampled responses: accuracy over all of them is pass@1
    assert main(["eval"] + TINY + chat + ["eval.samples=3", "eval.temperature=0.7", f"model={run_dir / 'final'}"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["samples"], out["examples"], out["accuracy"]) == (3, 2, 0.0)
