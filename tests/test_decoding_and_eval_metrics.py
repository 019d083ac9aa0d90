"""Decoding settings (rollout.repetition_penalty, no folder defaults), accuracy_paper, KL to the base model,
and the ledger's test-split columns (issue 13)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_es.config import ConfigError, load_config
from hpc_es.evaluate import EVAL_COLUMNS, kl_base_for_eval, ledger_columns, score_items
from hpc_es.kl import completion_kl, summarize
from hpc_es.ledger import LATER_COLUMNS, MATRIX, SCALARS, Ledger
from hpc_es.models import load_model, load_tokenizer
from hpc_es.rollout import eos_ids, generate, generate_ids, resolve_repetition_penalty
from hpc_es.tasks.base import Example
from hpc_es.tasks.countdown import CountdownTask, correct_by_paper_rule

PROMPTS = ["Q: what is 3 plus 4?\nA:", "0123456789", "Show your work in <think>"]
NEW = 24


@pytest.fixture(scope="module")
def folder_with_defaults(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model with a generation_config.json that sets a penalty and sampling defaults."""
    out = tmp_path_factory.mktemp("gen_defaults") / "model"
    shutil.copytree(tiny_model_dir, out)
    path = out / "generation_config.json"
    cfg = json.loads(path.read_text())
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    # tokens greedy decoding picks first: were the folder's suppress_tokens to leak in, the tokens would change
    firsts = sorted({int(model(**tok(p, return_tensors="pt")).logits[0, -1].argmax()) for p in PROMPTS})
    cfg.update(repetition_penalty=2.0, do_sample=True, temperature=0.7, top_k=5, top_p=0.8, no_repeat_ngram_size=2,
               min_new_tokens=3, suppress_tokens=firsts, begin_suppress_tokens=firsts)
    path.write_text(json.dumps(cfg))
    return str(out)


def _manual_greedy(model: torch.nn.Module, tok, prompt: str, penalty: float) -> list[int]:
    """Argmax over the model's logits, one token at a time; HF's penalty rule on every token seen so far
    (prompt included): a positive logit is divided by the penalty, a negative one multiplied."""
    ids = tok(prompt, return_tensors="pt")["input_ids"][0].tolist()
    stop = set(eos_ids(model, tok))
    out: list[int] = []
    for _ in range(NEW):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].clone()
        if penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            vals = logits[seen]
            logits[seen] = torch.where(vals < 0, vals * penalty, vals / penalty)
        nxt = int(torch.argmax(logits))
        ids.append(nxt)
        out.append(nxt)
        if nxt in stop:
            break
    return out


def test_penalty_values_and_errors(folder_with_defaults: str, tiny_model_dir: str) -> None:
    with_defaults = load_model(folder_with_defaults)
    plain = load_model(tiny_model_dir)
    assert resolve_repetition_penalty("model", with_defaults) == 2.0
    assert resolve_repetition_penalty("model", plain) == 1.0  # the folder has none: no penalty
    assert resolve_repetition_penalty("1.05", plain) == 1.05
    for bad in ("0", "-1", "nan", "inf", "high"):
        with pytest.raises(ConfigError, match="rollout.repetition_penalty"):
            resolve_repetition_penalty(bad, plain)
    assert load_config(None, ["rollout.repetition_penalty=model"]).rollout.repetition_penalty == "model"
    assert load_config(None, ["rollout.repetition_penalty=1.05"]).rollout.repetition_penalty == "1.05"
    with pytest.raises(ConfigError, match="rollout.repetition_penalty"):
        load_config(None, ["rollout.repetition_penalty=0"])


def test_folder_defaults_never_reach_greedy_decoding(folder_with_defaults: str) -> None:
    model, tok = load_model(folder_with_defaults), load_tokenizer(folder_with_defaults)
    differs = 0
    for prompt in PROMPTS:
        plain = generate_ids(model, tok, [prompt], NEW, repetition_penalty=1.0)[0]
        assert plain == _manual_greedy(model, tok, prompt, 1.0), prompt
        penalty = resolve_repetition_penalty("model", model)
        penalised = generate_ids(model, tok, [prompt], NEW, repetition_penalty=penalty)[0]
        assert penalised == _manual_greedy(model, tok, prompt, 2.0), prompt
        differs += plain != penalised
        # twice: no sampling (the folder says do_sample=true) and the folder's config is back afterwards
        assert generate_ids(model, tok, [prompt], NEW, repetition_penalty=1.0)[0] == plain
    assert differs >= 1  # the penalty changes the tokens, so the comparisons above can fail
    assert model.generation_config.repetition_penalty == 2.0 and model.generation_config.do_sample
    # a batch (left padding) gives the unpadded greedy tokens too
    batch = generate(model, tok, PROMPTS, NEW, batch_size=3)
    assert batch == [tok.decode(_manual_greedy(model, tok, p, 1.0), skip_special_tokens=True) for p in PROMPTS]


# --------------------------------------------------------------------------------------------- accuracy_paper

SUM = ([44, 19, 35], "44 + 19 + 35")


@pytest.mark.parametrize("target,numbers_expr,counts", [
    ("98", SUM, True), (98, SUM, True), ("98.0", SUM, False), (" 98", SUM, False), (98.0, SUM, False),
    ("-11", ([19, 35, 5], "19 - 35 + 5"), False), ("27.4", ([137, 5], "137 / 5"), False),
])
def test_accuracy_paper_reads_targets_with_isdigit(target, numbers_expr, counts) -> None:
    numbers, expr = numbers_expr
    text = f"r</think>\n<answer>{expr}</answer>"
    task = CountdownTask.__new__(CountdownTask)
    ex = Example(prompt="p", info={"numbers": numbers, "target": target})
    assert task.is_correct(text, ex)  # right by value
    assert task.is_correct_paper(text, ex) is counts
    assert correct_by_paper_rule(text, numbers, target) is counts


# --------------------------------------------------------------------------------------------- KL

def _perturbed(path: str, scale: float = 0.02) -> torch.nn.Module:
    model = load_model(path)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def test_kl_of_a_model_with_itself_is_zero_and_a_perturbed_one_matches_a_direct_sum(tiny_model_dir: str) -> None:
    base, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    ids = generate_ids(base, tok, PROMPTS, 12)
    same = completion_kl(base, load_model(tiny_model_dir), tok, PROMPTS, ids)
    assert [c.exact for c in same] == [0.0] * len(PROMPTS) and [c.k3 for c in same] == [0.0] * len(PROMPTS)
    assert [c.tokens for c in same] == [len(c) for c in ids]

    ft = _perturbed(tiny_model_dir)
    ft_ids = generate_ids(ft, tok, PROMPTS, 12)
    got = completion_kl(ft, base, tok, PROMPTS, ft_ids)
    for prompt, completion, (kl, _, n) in zip(PROMPTS, ft_ids, got):
        seq = tok(prompt)["input_ids"] + completion
        direct = 0.0
        for t in range(len(tok(prompt)["input_ids"]), len(seq)):  # each completion token's prediction
            lp = ft(input_ids=torch.tensor([seq[:t]])).logits[0, -1].double()
            lq = base(input_ids=torch.tensor([seq[:t]])).logits[0, -1].double()
            p = torch.exp(lp - torch.logsumexp(lp, 0))
            direct += float(sum(p[v] * ((lp[v] - torch.logsumexp(lp, 0)) - (lq[v] - torch.logsumexp(lq, 0)))
                                for v in range(lp.shape[0])))
        assert n == len(completion) > 0
        assert kl > 0 and kl == pytest.approx(direct, rel=1e-4, abs=1e-7)
    s = summarize(got)
    assert s["kl_per_completion"] == pytest.approx(sum(c.exact for c in got) / 3)
    assert s["kl_per_token"] == pytest.approx(sum(c.exact for c in got) / sum(c.tokens for c in got))


def test_score_items_carries_kl_and_paper_accuracy_as_eval_columns(tiny_model_dir: str) -> None:
    from hpc_es.comm import Comm

    cfg = load_config(None, ["task=countdown", "data.synthetic_size=12", "data.train_size=4", "threads=1"])
    task = CountdownTask(cfg)
    examples = list(task.test_examples())[:4]
    tok = load_tokenizer(tiny_model_dir)
    ft = _perturbed(tiny_model_dir)
    got = score_items(ft, tok, task, examples, 6, 2, Comm(), kl_base=tiny_model_dir)
    assert set(got) == {"mean_reward", "accuracy", "accuracy_paper", "kl_per_token", "kl_per_completion",
                        "kl_k3_per_token", "kl_k3_per_completion"}
    assert got["kl_per_token"] > 0 and got["kl_per_completion"] > got["kl_per_token"]
    row = ledger_columns(got)
    assert tuple(row) == EVAL_COLUMNS
    assert row["eval_reward"] == got["mean_reward"] and row["eval_kl_per_token"] == got["kl_per_token"]
    assert all(math.isnan(v) for v in ledger_columns(None).values())
    plain = score_items(ft, tok, task, examples, 6, 2, Comm())
    assert set(plain) == {"mean_reward", "accuracy", "accuracy_paper"} and plain["mean_reward"] == got["mean_reward"]


def test_eval_kl_base_model_defaults_and_errors(tmp_path: Path, tiny_model_dir: str) -> None:
    cfg = load_config(None, ["task=conciseness"])
    assert cfg.eval.kl == "auto"
    assert kl_base_for_eval(cfg, tiny_model_dir) is None  # auto: no base model known, no KL
    with pytest.raises(ConfigError, match="eval.base_model"):
        kl_base_for_eval(load_config(None, ["task=conciseness", "eval.kl=true"]), tiny_model_dir)
    assert kl_base_for_eval(load_config(None, ["task=countdown"]), tiny_model_dir) is None
    assert kl_base_for_eval(load_config(None, ["task=countdown", "eval.kl=true", "eval.base_model=/b"]), "x") == "/b"
    assert load_config(None, ["eval.kl=false"]).eval.kl == "false"
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    Ledger(2, {"config": "{}", "base_model": "/models/base"}).save(str(run / "log.h5"))
    assert kl_base_for_eval(cfg, str(run / "final")) == "/models/base"


def test_eval_json_carries_kl_and_accuracy_paper(tiny_model_dir: str, capsys: pytest.CaptureFixture) -> None:
    from hpc_es.cli import main

    code = main(["eval", "task=conciseness", "data.synthetic_size=12", "data.train_size=4", "data.test_size=3",
                 "rollout.max_new_tokens=5", "threads=1", "progress=false", f"eval.base_model={tiny_model_dir}"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kl_per_token"] == 0.0 and out["kl_per_completion"] == 0.0  # the base model against itself
    assert out["kl_base_model"] == tiny_model_dir
    code = main(["eval", "task=countdown", "data.synthetic_size=12", "data.train_size=4", "data.test_size=3",
                 "rollout.max_new_tokens=5", "threads=1", "progress=false", "rollout.repetition_penalty=model"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"accuracy", "accuracy_paper"} <= set(out) and "kl_per_token" not in out


# --------------------------------------------------------------------------------------------- ledger

def test_ledger_written_before_the_new_columns_still_loads(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "old.h5"
    old_scalars = [k for k in SCALARS if k not in LATER_COLUMNS]
    with h5py.File(path, "w") as f:
        f.attrs["version"] = 1
        f.attrs["config"] = "{}"
        f.attrs["events"] = "[]"
        for k in MATRIX:
            f.create_dataset(k, data=np.ones((2, 3), dtype=MATRIX[k]))
        for k in old_scalars:
            f.create_dataset(k, data=np.arange(2, dtype=SCALARS[k]))
    ledger = Ledger.load(str(path))
    assert len(ledger) == 2 and ledger.column("eval_accuracy").tolist() == [0.0, 1.0]
    for k in LATER_COLUMNS:
        assert np.isnan(ledger.column(k)).all()
    ledger.save(str(path))  # and it is written back with every column
    with h5py.File(path, "r") as f:
        assert set(SCALARS) <= set(f.keys())


def test_training_with_eval_every_records_kl_and_the_penalty(tmp_path: Path) -> None:
    from hpc_es.comm import Comm
    from hpc_es.trainer import train

    run_dir = tmp_path / "run"
    cfg = load_config(None, ["task=conciseness", "es.population_size=4", "es.iterations=2", "eval.every=1",
                             "eval.limit=3", "rollout.max_new_tokens=8", "rollout.prompts_per_iteration=4",
                             "threads=1", "progress=false", "checkpoint.every=0", "rollout.repetition_penalty=model",
                             f"run_dir={run_dir}"])
    train(cfg, Comm())
    ledger = Ledger.load(str(run_dir / "log.h5"))
    assert (ledger.column("shaped") != 0).any()  # an update happened
    kl = ledger.column("eval_kl_per_token")
    assert np.isfinite(kl).all() and (kl > 0).all()  # the updated weights moved away from the base model
    assert np.isfinite(ledger.column("eval_kl_per_completion")).all()
    assert np.isnan(ledger.column("eval_accuracy_paper")).all()  # conciseness has no accuracy
    assert ledger.config["rollout"]["repetition_penalty"] == "model"
