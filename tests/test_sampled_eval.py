"""eval.samples / temperature / top_p and the k3 KL estimate: by hand, against the exact KL, reproducible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_es.comm import Comm
from hpc_es.config import load_config
from hpc_es.errors import ConfigError
from hpc_es.evaluate import score_items
from hpc_es.kl import completion_kl, k3_terms
from hpc_es.models import load_model, load_tokenizer
from hpc_es.rollout import generate_ids
from hpc_es.sampling import item_seed, sample_ids
from hpc_es.tasks.conciseness import ConcisenessTask


def _perturbed(path: str, scale: float = 0.05) -> torch.nn.Module:
    model = load_model(path)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def test_k3_by_hand() -> None:
    # p_ft = 1/2, p_base = 1/4: r = 1/2, k3 = 1/2 - log(1/2) - 1 = log 2 - 1/2
    got = k3_terms(torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.2)]))
    assert got[0].item() == pytest.approx(math.log(2) - 0.5, rel=1e-6) and got[1].item() == 0.0
    # r = 3: 3 - log 3 - 1
    assert k3_terms(torch.tensor(math.log(0.1)), torch.tensor(math.log(0.3))).item() == pytest.approx(
        2 - math.log(3), rel=1e-6)


def test_completion_k3_is_the_sum_over_the_generated_tokens(tiny_model_dir: str) -> None:
    base, tok, ft = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir), _perturbed(tiny_model_dir)
    prompt = "Q: what is 3 plus 4?\nA:"
    ids = sample_ids(ft, tok, prompt, 3, 6, seed=11)
    for completion, got in zip(ids, completion_kl(ft, base, tok, [prompt] * 3, ids)):
        seq = tok(prompt)["input_ids"] + completion
        hand = 0.0
        for t in range(len(tok(prompt)["input_ids"]), len(seq)):
            lp = torch.log_softmax(ft(input_ids=torch.tensor([seq[:t]])).logits[0, -1].double(), 0)[seq[t]].item()
            lq = torch.log_softmax(base(input_ids=torch.tensor([seq[:t]])).logits[0, -1].double(), 0)[seq[t]].item()
            hand += math.exp(lq - lp) - (lq - lp) - 1
        assert got.tokens == len(completion) > 0 and got.k3 == pytest.approx(hand, rel=1e-4, abs=1e-7)


def test_k3_mean_over_samples_approaches_the_exact_kl(tiny_model_dir: str) -> None:
    """One new token: the exact KL is the KL of one next-token distribution, and k3 over samples drawn from the
    fine-tuned model is an unbiased estimate of it whose error shrinks like 1/sqrt(samples)."""
    base, tok, ft = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir), _perturbed(tiny_model_dir)
    prompt = "Q: what is the opposite of hot?\nA:"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(ft(input_ids=ids).logits[0, -1].double(), 0)
        lq = torch.log_softmax(base(input_ids=ids).logits[0, -1].double(), 0)
    exact = float((lp.exp() * (lp - lq)).sum())
    tokens = [c[0] for c in sample_ids(ft, tok, prompt, 4000, 1, seed=3)]
    k3 = k3_terms(lp[tokens], lq[tokens]).numpy()
    errors = [abs(k3[:n].mean() - exact) for n in (10, 4000)]
    assert exact > 0.05
    assert errors[1] < 3 * k3.std() / math.sqrt(4000) and errors[1] < 0.05 * exact
    assert errors[1] < errors[0]


def _task(test_size: int = 3) -> ConcisenessTask:
    return ConcisenessTask(load_config(None, ["data.synthetic_size=40", "data.train_size=4",
                                              f"data.test_size={test_size}"]))


def test_sampled_eval_is_reproducible_and_its_k3_tracks_the_exact_kl(tiny_model_dir: str) -> None:
    tok, ft, task = load_tokenizer(tiny_model_dir), _perturbed(tiny_model_dir), _task()
    examples = list(task.test_examples())

    def run(samples: int, seed: int = 0) -> dict[str, float]:
        return score_items(ft, tok, task, examples, 4, 64, Comm(), kl_base=tiny_model_dir, samples=samples,
                           sample_seed=seed)

    a, b, other = run(300), run(300), run(300, seed=1)
    assert a == b and a != other  # the same seed draws the same samples
    assert set(a) == {"mean_reward", "kl_per_token", "kl_per_completion", "kl_k3_per_token", "kl_k3_per_completion"}
    # both estimate the KL of the sampled completions; k3 only from the tokens that were drawn
    assert a["kl_k3_per_completion"] == pytest.approx(a["kl_per_completion"], rel=0.1)
    assert a["kl_k3_per_token"] == pytest.approx(a["kl_per_token"], rel=0.1)
    greedy = run(1)
    assert greedy["mean_reward"] != a["mean_reward"]


def test_one_item_gets_the_same_samples_alone_or_among_others(tiny_model_dir: str) -> None:
    """Item i's draws depend on (seed, i) only: any number of ranks, any batch, gives the same responses."""
    tok, ft = load_tokenizer(tiny_model_dir), _perturbed(tiny_model_dir)
    prompt = "Q: what is 3 plus 4?\nA:"
    first = sample_ids(ft, tok, prompt, 5, 6, seed=item_seed(0, 2))
    torch.manual_seed(123)  # the global generator's state does not matter
    assert sample_ids(ft, tok, prompt, 5, 6, seed=item_seed(0, 2)) == first
    assert sample_ids(ft, tok, prompt, 5, 6, seed=item_seed(0, 3)) != first
    assert len({tuple(c) for c in first}) > 1  # sampled, not five copies of the greedy answer
    greedy = generate_ids(ft, tok, [prompt], 6)[0]
    assert sample_ids(ft, tok, prompt, 5, 6, seed=1, temperature=1e-4) == [greedy] * 5


def test_sampling_keys_are_checked() -> None:
    assert load_config(None, ["eval.samples=20", "eval.top_p=0.9"]).eval.samples == 20
    for bad in ("eval.samples=0", "eval.temperature=0", "eval.top_p=0", "eval.top_p=1.5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


def test_eval_json_and_ledger_carry_the_k3_columns(tiny_model_dir: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from hpc_es.cli import main
    from hpc_es.ledger import Ledger
    from hpc_es.trainer import train

    run_dir = tmp_path / "run"
    cfg = load_config(None, ["es.population_size=4", "es.iterations=2", "eval.every=2", "eval.limit=2",
                             "eval.samples=3", "rollout.max_new_tokens=6", "rollout.prompts_per_iteration=4",
                             "threads=1", "progress=false", "checkpoint.every=0", f"run_dir={run_dir}"])
    train(cfg, Comm())
    ledger = Ledger.load(str(run_dir / "log.h5"))
    k3 = ledger.column("eval_kl_k3_per_completion")
    assert np.isnan(k3[0]) and k3[1] > 0 and ledger.column("eval_kl_k3_per_token")[1] > 0
    code = main(["eval", f"model={run_dir / 'final'}", "eval.limit=2", "eval.samples=3", "rollout.max_new_tokens=6",
                 "threads=1", "progress=false"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["samples"] == 3 and out["kl_k3_per_completion"] == pytest.approx(k3[1])
    assert out["mean_reward"] == pytest.approx(ledger.column("eval_reward")[1])
