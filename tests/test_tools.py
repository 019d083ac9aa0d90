"""The benchmark tools: the baseline really has the published code's faults, and the scripts still run.

No timing is asserted (the figures are the scripts' output, not a test's); these tests keep the tools
working as the engine and trainer change under them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import PY, ROOT

sys.path.insert(0, str(ROOT / "tools"))
import baseline  # noqa: E402  (tools/baseline.py)

from hpc_es.es import Engine, Replica  # noqa: E402


def Twins(dtype: torch.dtype) -> torch.nn.Module:
    """Two same-shape matrices ``a`` and ``b``, and a ``norm`` vector of ones (like RMSNorm weights)."""
    g = torch.Generator().manual_seed(3)
    m = torch.nn.Module()
    for name, value in (("a", torch.randn(64, 8, generator=g)), ("b", torch.randn(64, 8, generator=g)),
                        ("norm", torch.ones(512))):
        m.register_parameter(name, torch.nn.Parameter(value.to(dtype)))
    return m


def _delta(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float() - before[n].float() for n, p in model.named_parameters()}


def _zero_twins() -> torch.nn.Module:
    m = Twins(torch.float32)
    with torch.no_grad():
        m.a.zero_()
        m.b.zero_()  # from zero, the weights after a perturbation are the noise itself
    return m


def test_baseline_reuses_noise_across_same_shape_tensors_and_hpc_es_does_not() -> None:
    m = _zero_twins()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    baseline.perturb(m, seed=7, sigma=1e-2)
    d = _delta(before, m)
    assert torch.equal(d["a"], d["b"])  # the published fault: one seed for every tensor

    m = _zero_twins()
    rep = Replica.wrap(m, "device")
    Engine(1 << 20).perturb(rep, seed=7, sign=1, sigma=1e-2)
    d = _delta(before, m)
    assert not torch.allclose(d["a"], d["b"])
    assert d["a"].abs().min() > 0


def test_baseline_restore_drifts_in_bf16_and_misses_weights_at_one() -> None:
    m = Twins(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    baseline.perturb(m, seed=11, sigma=1e-3)
    # sigma*eps is below half a bf16 step at 1.0 for most entries: the perturbation never moves them
    assert (m.norm.detach() == 1.0).float().mean() > 0.5
    baseline.restore(m, seed=11, sigma=1e-3)
    drifted = sum(int((p.detach() != before[n]).sum()) for n, p in m.named_parameters())
    assert drifted > 0  # add-then-subtract in bf16 does not come back

    m = Twins(torch.bfloat16)
    rep = Replica.wrap(m, "device")
    eng = Engine(1 << 20)
    eng.perturb(rep, seed=11, sign=1, sigma=1e-3)
    eng.restore(rep)
    for n, p in m.named_parameters():
        assert torch.equal(p.detach().view(torch.int16), before[n].view(torch.int16)), n


def _run(script: str, args: list[str], path: str = "") -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [path, str(ROOT)])),
               HPC_ES_NOISE_COMPILE="0")  # no compile time in a test
    proc = subprocess.run([PY, str(ROOT / "tools" / script)] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _phases(table: str) -> dict[str, list[float]]:
    rows = {}
    for name in ("perturb", "rollout", "reward", "restore", "update", "iteration"):
        m = re.search(rf"^\s+{name}\s+([\d.]+)\s+([\d.]+)", table, re.M)
        assert m, f"no {name} row in\n{table}"
        rows[name] = [float(m.group(1)), float(m.group(2))]
    return rows


@pytest.mark.integration
def test_bench_prints_both_implementations_and_every_target() -> None:
    out = _run("bench.py", ["--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--n", "6",
                            "--prompts", "2", "--tokens", "4", "--iterations", "1", "--warmup", "0", "--json",
                            "--no-decode"])
    rows = _phases(out)
    assert rows["restore"][0] == 0.0 and rows["restore"][1] > 0  # hpc_es needs no restore pass; baseline does
    assert all(v > 0 for v in rows["rollout"] + rows["update"] + rows["perturb"])
    for target in ("ES overhead vs baseline", "ES overhead share of iteration", "noise vs 1-stream randn limit",
                   "rollout tokens/s vs plain", "whole iteration hpc_es/baseline", "keyed vs torch.randn"):
        assert target in out, target
    assert "N=6, 2 prompts, 4 new tokens" in out
    # the rollout engines (tools/bench_rollout.py) and the one JSON line that ends the output
    assert "== rollout engines" in out and "fast_over_hf_ragged" in out
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("es_overhead_over_baseline", "overhead_share", "iteration_over_baseline", "noise_over_randn"):
        assert summary[key] > 0, key
    assert set(summary["rollout_tokens_per_s"]) == {"ragged", "uniform"}
    assert all(v > 0 for r in summary["rollout_tokens_per_s"].values() for v in (r["hf"], r["fast"]))
    assert set(summary["fast_over_hf"]) == {"ragged", "uniform", "iteration"}
    assert {"fast_over_hf_ragged", "fast_over_hf_uniform", "fast_over_hf_iteration",
            "overhead_share"} <= set(summary["pass"]) and all(isinstance(v, bool) for v in summary["pass"].values())
    # no timed phase compiled a kernel: with no warm-up iteration at all, the N=6 update's 4-term and 2-term
    # accumulates, the perturb and the keyed fill were built before any timing started
    assert summary["kernels_built_while_timed"] == 0 and summary["pass"]["no_kernel_built_while_timed"]
    assert "decode_kernels_per_step" not in summary  # --no-decode (see the next test)


@pytest.mark.integration
def test_bench_decode_figures_count_kernels_eager_and_compiled() -> None:
    """bench.py --json's decode_kernels_per_step and compiled_over_eager, on a one-layer bench model: on a CPU
    the compiled step calls out to fewer operators than the eager one (inductor fuses the rest)."""
    import bench

    got = bench.decode_figures(bench.Arch(hidden=32, layers=1, heads=4, kv_heads=2), torch.float32, "cpu", 2, 6)
    kernels = got["decode_kernels_per_step"]
    assert 0 < kernels["compiled"] < kernels["eager"]
    assert got["compiled_over_eager"] > 0 and not got["compiled_decode"]["refused"]


@pytest.mark.integration
def test_gpu_check_runs_on_cpu_with_the_tiny_architecture(tmp_path) -> None:
    """The CPU dry run: every phase ends with an ``ok`` record in --out, with no submitit installed (the GPU
    machine has none)."""
    blocked = tmp_path / "no_submitit" / "submitit"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('submitit is not installed here')\n")
    report = tmp_path / "gpu_check.json"
    out = _run("gpu_check.py", ["--tiny", "--n", "2", "--prompts", "2", "--tokens", "2", "--warmup", "0",
                                "--budget-s", "3600", "--out", str(report)], path=str(blocked.parent))
    phases = json.loads(report.read_text())["phases"]
    assert list(phases) == ["exactness", "tiny.build", "tiny.engines", "tiny.perturb_update", "tiny.noise_bits",
                            "tiny.compiled", "tiny.iteration", "tiny.kernels", "lowrank", "tiny.es_table",
                            "tiny.master"]
    # every phase ran but the compiled decode step (compiling on a CPU takes minutes)
    skipped = phases.pop("tiny.compiled")
    assert (skipped["status"], skipped["reason"]) == ("skipped", "--tiny: a CPU dry run") and "result" not in skipped
    assert all(p["status"] == "ok" for p in phases.values()), {k: p.get("error") for k, p in phases.items()}
    assert "tiny Qwen2.5-shaped" in out and "bfloat16, cpu" in out and "N=2, 2 prompts, 2 new tokens" in out
    assert re.search(r"gpu_check: \d+s in all", out)
    # the engines, on the CPU: fast == hf token for token, first-step logits included
    assert phases["exactness"]["result"] == {"ragged": True, "uniform": True}
    eng = phases["tiny.engines"]["result"]
    assert eng["fast_replay_identical"] and eng["tokens"] > 8 and eng["fast_tokens_per_s"] > 0
    assert eng["first_step"]["first_token_identical"] == 1.0 and eng["first_step"]["rows"] == 8
    # the paper iteration from the measured pieces: N x (member + perturb) + update
    assert list(phases["tiny.kernels"]["result"]) == ["eager"] and phases["tiny.kernels"]["result"]["eager"] > 0
    pu, it = phases["tiny.perturb_update"]["result"], phases["tiny.iteration"]["result"]
    assert it["member_rollout_s"] == eng["fast_s"]
    assert it["iteration_s"] == pytest.approx(30 * (it["member_rollout_s"] + pu["perturb_s"]) + pu["update_s"])
    assert pu["kernels_built_while_timed"] == 0
    assert not phases["tiny.noise_bits"]["result"]["mismatches"]
    rows = _phases(out.replace("        -", " 0.0"))
    assert rows["rollout"][0] > 0
    # the master checks (issue 12): host and device masters agree, only the fp32 master moves norm weights
    master = json.loads(out.split("gpu_check master: ", 1)[1].splitlines()[0])
    assert master == phases["tiny.master"]["result"]
    assert master["ok"] and not master["problems"]
    got = master["settings"]
    assert got["device/model"]["norm_moved"] == 0.0 and got["device/float32"]["norm_moved"] == 1.0
    assert got["host/float32"]["master_digest"] == got["device/float32"]["master_digest"]
    assert got["device/float32"]["master_bytes"] == 2 * got["device/model"]["master_bytes"]


def test_gpu_check_phases_record_errors_skip_when_short_of_time_and_write_as_they_go(tmp_path) -> None:
    import gpu_check

    path = tmp_path / "report.json"
    check = gpu_check.Check(str(path), budget_s=60.0, report={})
    seen = []

    def boom() -> None:
        raise RuntimeError("CUDA out of memory")

    assert check.phase("first", 1, lambda: {"x": 1}) == {"x": 1}
    assert check.phase("second", 1, boom) is None
    # each record is on disk before the next phase starts: a crash keeps what came before
    check.phase("third", 1, lambda: seen.append(json.loads(path.read_text())["phases"]) or 3)
    assert list(seen[0]) == ["first", "second"] and seen[0]["second"]["status"] == "error"
    assert seen[0]["second"]["error"] == "RuntimeError: CUDA out of memory"
    assert check.phase("long", 120, lambda: seen.append("ran")) is None  # 120 s expected, under 60 s left
    assert "ran" not in seen
    got = json.loads(path.read_text())["phases"]
    assert [got[k]["status"] for k in ("first", "second", "third", "long")] == ["ok", "error", "ok", "skipped"]
    assert got["third"]["result"] == 3 and got["long"]["reason"].endswith("the phase takes about 120 s")


@pytest.mark.integration
def test_bench_warm_up_builds_every_kernel_a_timed_update_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the compiled noise kernels on, benchlib.warm_kernels on a scratch tensor builds every kernel a
    whole-model perturb and an N=30 update use (the update's 4-term and 2-term accumulates among them): the
    timed calls after it compile nothing, and their weights are those of the eager path."""
    import bench_noise
    import benchlib

    from hpc_es.seeds import member_seeds

    monkeypatch.setenv("HPC_ES_NOISE_COMPILE", "1")
    model = benchlib.build_model(benchlib.Arch(hidden=32, layers=1, heads=4, kv_heads=2), torch.bfloat16, "cpu")
    ref = benchlib.build_model(benchlib.Arch(hidden=32, layers=1, heads=4, kv_heads=2), torch.bfloat16, "cpu")
    rep, eager_rep = Replica.wrap(model, "device"), Replica.wrap(ref, "device")
    eng = Engine(1 << 20)
    benchlib.warm_kernels(eng, rep)
    before = bench_noise.compiles()
    seeds, signs = member_seeds(0, 0, 30, False)
    shaped = (np.arange(30, dtype=np.float64) - 14.5) / 30
    eng.perturb(rep, int(seeds[3]), 1, 1e-3)
    eng.update([rep], seeds, signs, shaped, 1e-3)
    assert bench_noise.compiles() == before
    monkeypatch.setenv("HPC_ES_NOISE_COMPILE", "0")
    eager = Engine(1 << 20)
    eager.perturb(eager_rep, int(seeds[3]), 1, 1e-3)
    eager.update([eager_rep], seeds, signs, shaped, 1e-3)
    for (name, p), (_, q) in zip(rep.params, eager_rep.params):
        assert torch.equal(p, q), name
