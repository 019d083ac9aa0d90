#!/usr/bin/env python
"""GPU check: the rollout engines and tools/bench.py's table for random Qwen2.5-1.5B and 7B architectures.

Rollout engines first (issue 11), the JSON file (``--out``) rewritten after each phase (the low-rank
population throughput of issue 14 runs right after the exactness check: see check_lowrank):

1. ``exactness``: a small fp32 model on the GPU, the fast engine (CUDA graphs, row compaction, ragged
   schedule) against HF generate: token ids must be identical.
2. ``engines`` per model (bf16): one member's rollout as the paper runs it -- 200 prompts of 100-140
   tokens, completion lengths from the schedule (exponential, mean 300, capped at 1024, one row at 1024):
   seconds per member for hf and fast (fast: the first call captures the graphs, the second is timed too),
   decode-step time at 200 rows, peak memory against weights + master + KV cache + 4 GiB.

Then the ES table: bf16, N=30, 16 prompts x 32 new tokens, one timed iteration of hpc_es and of the
published-code baseline each (after a 2-member warm-up), on one GPU; meant to finish within 8 minutes on an
H100/H200 (--no-es, --master-updates 0, --no-lowrank trim it).  The
architectures are written out below (no download); the tokenizer is hpc_es's tiny one, so most sampled
ids of the 151936-entry vocabulary decode to nothing, which changes no cost that is timed.

    .venv/bin/python tools/gpu_check.py                 # both models on cuda
    .venv/bin/python tools/gpu_check.py --only 1.5B --chunk 67108864
    .venv/bin/python tools/gpu_check.py --tiny          # the same script on CPU, tiny architecture

First, per model, the keyed noise: CUDA against CPU bit for bit on a sample of the model's tensors, its
statistics on the GPU, and a whole-model perturb timed (tools/bench_noise.py).  Results go to --out after
every phase; the exit status is 1 when any noise bit or statistic is wrong.

After each model: the es.master_dtype / es.master_on checks (master_checks): the same update from the same
weights with the master on the device and on the host, in the model dtype and in fp32; they must agree,
the fp32 master must move the RMSNorm weights, and memory is printed by component.  Exit 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: model building, both implementations, limits, the table)
import bench_noise  # noqa: E402  (tools/bench_noise.py: keyed noise checks and timings)
from hpc_es.es import Engine, Replica  # noqa: E402
from hpc_es.models import named_params, tensor_digest, weights_digest  # noqa: E402
from hpc_es.seeds import member_seeds  # noqa: E402
import bench_rollout  # noqa: E402  (tools/bench_rollout.py: the length schedule)

from hpc_es import fastgen  # noqa: E402
from hpc_es.rollout import _ForceEOS, generation_config  # noqa: E402

TARGET_SPEEDUP = {"1.5B": 4.0, "7B": 2.0}

VOCAB = 151936
ARCHS = {
    # Qwen2.5-1.5B: hidden 1536, 28 layers, 12 query / 2 key-value heads, MLP 8960, tied embeddings.
    "1.5B": bench.Arch("Qwen2.5-1.5B (random init)", hidden=1536, layers=28, heads=12, kv_heads=2,
                       intermediate=8960, vocab=VOCAB, tie=True),
    # Qwen2.5-7B: hidden 3584, 28 layers, 28 query / 4 key-value heads, MLP 18944, untied embeddings.
    "7B": bench.Arch("Qwen2.5-7B (random init)", hidden=3584, layers=28, heads=28, kv_heads=4,
                     intermediate=18944, vocab=VOCAB, tie=False),
}
TINY = bench.Arch("tiny Qwen2.5-shaped (CPU check of this script)", hidden=32, layers=2, heads=4, kv_heads=2,
                  intermediate=96, vocab=VOCAB, tie=True)


# ---- master weights: es.master_dtype and es.master_on (issue 12) ---------------------------------------
MASTER_SETTINGS = [("device", "model"), ("host", "model"), ("device", "float32"), ("host", "float32")]


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def master_checks(arch: bench.Arch, *, dtype: torch.dtype, device: str, n: int, chunk: int,
                  updates: int = 1, sigma: float = 1e-3, alpha: float = 5e-4) -> dict:
    """The same updates from the same weights under each (es.master_on, es.master_dtype): host and device
    masters must give the same master and working-weight digests, an fp32 master must move the RMSNorm
    weights (which a bf16 master cannot at the paper's sigma and alpha), and the device-side digest must
    equal the CPU's on sample tensors.  Prints memory by component; returns what it found (``ok``)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    mem = (lambda: torch.cuda.memory_allocated(dev)) if cuda else (lambda: 0)
    model = bench.build_model(arch, dtype, device)
    weights_bytes = sum(p.numel() * p.element_size() for _, p in named_params(model))
    start = {name: p.detach().to("cpu", copy=True) for name, p in named_params(model)}
    norms = [name for name in start if "norm" in name]
    out: dict = {"arch": arch.name, "weights": weights_bytes, "settings": {}, "problems": []}
    print(f"-- master checks: {arch.name}, {updates} update(s) at sigma={sigma:g} alpha={alpha:g} N={n}; "
          f"weights {_gib(weights_bytes)}", flush=True)
    for master_on, master_dtype in MASTER_SETTINGS:
        with torch.no_grad():
            for name, p in named_params(model):
                p.copy_(start[name])
        base_mem = mem()
        rep = Replica.wrap(model, master_on, master_dtype)
        master_bytes = sum(t.numel() * t.element_size() for t in rep.master.values())
        master_dev = mem() - base_mem
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        eng = Engine(chunk)
        t0 = time.perf_counter()
        for t in range(updates):
            seeds, signs = member_seeds(12, t, n)
            eng.perturb(rep, int(seeds[0]), 1, sigma)
            shaped = (np.arange(n, dtype=np.float64) - (n - 1) / 2) / n
            eng.update([rep], seeds, signs, shaped, alpha)
        if cuda:
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - t0
        scratch = (torch.cuda.max_memory_allocated(dev) - mem()) if cuda else 0
        moved = float(np.mean([(rep.master[name] != start[name].to(rep.master[name].dtype)).float().mean().item()
                               for name in norms])) if norms else float("nan")
        got = {"master_digest": weights_digest(sorted(rep.master.items())),
               "working_digest": weights_digest(rep.params), "norm_moved": moved,
               "master_bytes": master_bytes, "master_on_device": master_dev, "update_scratch_peak": scratch,
               "seconds": elapsed}
        # the device digest against the CPU's, on the first and the largest tensors
        for name, p in (rep.params[0], max(rep.params, key=lambda kv: kv[1].numel())):
            if tensor_digest(p) != tensor_digest(p.to("cpu")):
                out["problems"].append(f"{master_on}/{master_dtype}: device digest of {name} differs from the CPU's")
        out["settings"][f"{master_on}/{master_dtype}"] = got
        print(f"   master_on={master_on:6s} master_dtype={master_dtype:7s} master {_gib(master_bytes)} "
              f"({'on the device' if master_on == 'device' else 'host'}; +{_gib(master_dev)} device), update scratch "
              f"peak {_gib(scratch)}, {elapsed:.1f} s; norm weights moved: {moved:.1%}; "
              f"digest {got['master_digest'][:12]}", flush=True)
        del rep, eng
        if cuda:
            torch.cuda.empty_cache()
    s = out["settings"]
    for kind in ("model", "float32"):
        a, b = s[f"device/{kind}"], s[f"host/{kind}"]
        for key in ("master_digest", "working_digest"):
            if a[key] != b[key]:
                out["problems"].append(f"master_dtype={kind}: master_on=host gives another {key} than device")
    if dtype != torch.float32:  # in fp32 models both settings are one
        if s["device/model"]["norm_moved"] != 0.0:
            out["problems"].append("a model-dtype master moved norm weights: the rounding analysis is wrong")
        if not s["device/float32"]["norm_moved"] > 0.9:
            out["problems"].append(f"an fp32 master moved only {s['device/float32']['norm_moved']:.1%} of norm weights")
    out["ok"] = not out["problems"]
    for p in out["problems"]:
        print(f"   MISMATCH: {p}", flush=True)
    del model, start
    if cuda:
        torch.cuda.empty_cache()
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _prompts(rows: int, lo: int, hi: int, vocab: int, pad: int, eos: int, device: str, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of lo..hi tokens (no pad or EOS inside)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (rows,), generator=g)
    P = int(lens.max())
    ids = torch.randint(0, vocab, (rows, P), generator=g)
    ids[(ids == pad) | (ids == eos)] = 2
    mask = torch.zeros(rows, P, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        mask[i, P - n:] = 1
        ids[i, : P - n] = pad
    return ids.to(device), mask.to(device)


def _decode(engine: str, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int,
            sched: list[int] | None, gen_cfg: Any, eos: int, pad: int) -> tuple[torch.Tensor, float]:
    dev = str(ids.device)
    _sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        if engine == "fast":
            out = fastgen.generate_ids(model, ids, mask, new, eos, pad, length_schedule=sched)
        else:
            gen_cfg.max_new_tokens = new
            procs = [_ForceEOS(sched, ids.shape[1], eos)] if sched is not None else None
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                 logits_processor=procs)[:, ids.shape[1]:]
    _sync(dev)
    return out, time.perf_counter() - t0


def exactness(device: str) -> dict[str, Any]:
    """fp32 on the device: fast (graphs, compaction, schedule) == HF, token for token."""
    arch = bench.Arch("exactness", hidden=64, layers=2, heads=4, kv_heads=1, intermediate=128)
    model = bench.build_model(arch, torch.float32, device)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # sharpened logits: no float near-ties
    tok = bench.tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    gen_cfg = generation_config(model, tok, 64)
    ids, mask = _prompts(37, 1, 40, model.config.vocab_size, pad, eos, device, seed=1)
    sched = bench_rollout.length_schedule(37, 12.0, 64, seed=1)
    out = {}
    for name, s in (("ragged", sched), ("uniform", None)):
        want, _ = _decode("hf", model, ids, mask, 64, s, gen_cfg, eos, pad)
        got1, _ = _decode("fast", model, ids, mask, 64, s, gen_cfg, eos, pad)
        got2, _ = _decode("fast", model, ids, mask, 64, s, gen_cfg, eos, pad)  # replayed graphs
        out[name] = bool(torch.equal(want, got1) and torch.equal(want, got2))
    return out


class _Mem:
    """CUDA memory statistics (zeros on the CPU, where --tiny runs the same phases)."""

    def __init__(self, device: str) -> None:
        self.dev = torch.device(device)
        self.cuda = self.dev.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.dev) if self.cuda else 0

    def now(self) -> int:
        return torch.cuda.memory_allocated(self.dev) if self.cuda else 0


def engines(key: str, arch: bench.Arch, dtype: torch.dtype, device: str, rows: int, cap: int,
            mean: float) -> dict[str, Any]:
    """One member's rollout at the paper's scale with each engine, and the fast engine's memory."""
    mem = _Mem(device)
    model = bench.build_model(arch, dtype, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tok = bench.tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    gen_cfg = generation_config(model, tok, cap)
    ids, mask = _prompts(rows, 100, 140, arch.vocab, pad, eos, device)
    sched = bench_rollout.length_schedule(rows, mean, cap)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    slots = -(-(ids.shape[1] + cap) // 256) * 256
    kv = cfg.num_hidden_layers * 2 * rows * cfg.num_key_value_heads * slots * head_dim * torch.finfo(dtype).bits // 8
    res: dict[str, Any] = {"rows": rows, "prompt_len": int(ids.shape[1]), "tokens": int(sum(sched)),
                           "weights_gib": weights / 2**30, "kv_cache_gib": kv / 2**30}
    mem.reset()
    base = mem.now()
    fast1, res["fast_first_s"] = _decode("fast", model, ids, mask, cap, sched, gen_cfg, eos, pad)  # + capture
    fast2, res["fast_s"] = _decode("fast", model, ids, mask, cap, sched, gen_cfg, eos, pad)
    res["fast_peak_gib"] = mem.peak() / 2**30
    res["fast_extra_gib"] = (mem.peak() - base) / 2**30
    # peak <= weights + master (the ES copy, not allocated here) + KV cache + 4 GiB
    res["memory_bound_gib"] = (2 * weights + kv) / 2**30 + 4
    res["memory_ok"] = res["fast_peak_gib"] + weights / 2**30 <= res["memory_bound_gib"]
    _, t1 = _decode("fast", model, ids, mask, 1, None, gen_cfg, eos, pad)
    _, t33 = _decode("fast", model, ids, mask, 33, [33] * rows, gen_cfg, eos, pad)
    res["fast_decode_step_ms"] = (t33 - t1) / 32 * 1e3
    mem.reset()
    hf, res["hf_s"] = _decode("hf", model, ids, mask, cap, sched, gen_cfg, eos, pad)
    res["hf_peak_gib"] = mem.peak() / 2**30
    _, h1 = _decode("hf", model, ids, mask, 1, None, gen_cfg, eos, pad)
    _, h17 = _decode("hf", model, ids, mask, 17, [17] * rows, gen_cfg, eos, pad)
    res["hf_decode_step_ms"] = (h17 - h1) / 16 * 1e3
    width = min(hf.shape[1], fast2.shape[1])
    # bf16: the kernels differ from HF's, so near-ties may break differently; the share of identical rows
    res["rows_identical_to_hf"] = float((hf[:, :width] == fast2[:, :width]).all(1).float().mean())
    res["fast_replay_identical"] = bool(torch.equal(fast1, fast2))
    res["speedup"] = res["hf_s"] / res["fast_s"]
    res["target_speedup"] = TARGET_SPEEDUP.get(key)
    res["pass"] = {"speedup": res["speedup"] >= (res["target_speedup"] or 0), "memory": res["memory_ok"]}
    del model
    if mem.cuda:
        torch.cuda.empty_cache()
    return res


def _write(path: str | None, report: dict[str, Any]) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="run on CPU with a tiny architecture (a dry run)")
    ap.add_argument("--only", choices=sorted(ARCHS), action="append", help="run only this model (repeatable)")
    bench.add_args(ap)
    ap.set_defaults(dtype="bfloat16", device="cuda", n=30, prompts=16, tokens=32, iterations=1, warmup=1)
    ap.add_argument("--warmup-n", type=int, default=2, help="members per warm-up iteration")
    ap.add_argument("--no-noise", action="store_true", help="skip the keyed noise checks")
    ap.set_defaults(chunk=1 << 26)  # keyed noise: the chunk changes no bit; big pieces keep the GPU busy
    ap.add_argument("--master-updates", type=int, default=1, help="updates per es.master_* setting (0: skip)")
    ap.add_argument("--no-lowrank", action="store_true", help="skip the low-rank population throughput check")
    ap.add_argument("--out", default=None, help="JSON report, rewritten after each phase (default: "
                    "gpu_check.json on a GPU, none with --tiny)")
    ap.add_argument("--rows", type=int, default=200, help="prompts per member in the engines phase")
    ap.add_argument("--cap", type=int, default=1024, help="max new tokens in the engines phase")
    ap.add_argument("--no-es", action="store_true", help="skip the ES iteration table")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
        archs = [TINY]
        engine_archs = {"tiny": TINY}
        args.rows, args.cap = min(args.rows, 8), min(args.cap, 24)
    else:
        if not torch.cuda.is_available() and args.device.startswith("cuda"):
            print("gpu_check: torch sees no GPU (use --tiny for a CPU dry run)", file=sys.stderr)
            return 2
        archs = [ARCHS[k] for k in (args.only or ["1.5B", "7B"])]
        engine_archs = {k: ARCHS[k] for k in (args.only or ["1.5B", "7B"])}
        args.out = args.out or "gpu_check.json"
    dtype = bench.resolve(args)
    t0 = time.perf_counter()
    failed = False
    failures: list[str] = []  # issue 12: keyed noise mismatches
    import transformers

    report: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "date": time.strftime("%Y-%m-%d"), "device": args.device}
    report["device_name"] = (torch.cuda.get_device_name(torch.device(args.device))
                             if args.device.startswith("cuda") else "cpu")
    print(f"device: {report['device_name']}, torch {torch.__version__}, transformers {transformers.__version__}",
          flush=True)
    report["exactness"] = exactness(args.device)
    print(f"exactness (fp32, fast vs hf, identical token ids): {report['exactness']}", flush=True)
    _write(args.out, report)
    if not args.no_lowrank:  # issue 14, early: about a minute
        report["lowrank"] = check_lowrank(args.tiny, args.device)
        _write(args.out, report)
    # the engines at the paper's scale (--tiny: a few rows of the tiny architecture)
    for key, arch in engine_archs.items():
        r = engines(key, arch, dtype, args.device, args.rows, args.cap, 300.0 if not args.tiny else 8.0)
        report.setdefault("engines", {})[key] = r
        print(f"engines {key}: hf {r['hf_s']:.1f}s/member, fast {r['fast_s']:.1f}s/member (first call "
              f"{r['fast_first_s']:.1f}s) = {r['speedup']:.2f}x (target {r['target_speedup']}x); decode step "
              f"at {r['rows']} rows: hf {r['hf_decode_step_ms']:.1f} ms, fast {r['fast_decode_step_ms']:.1f} ms;"
              f" peak {r['fast_peak_gib']:.1f} GiB (bound {r['memory_bound_gib']:.1f}); rows identical to hf "
              f"{r['rows_identical_to_hf']:.0%}", flush=True)
        _write(args.out, report)
    if args.no_es:
        archs = []
    report["noise_failures"] = failures
    for arch in archs:
        if not args.no_noise:  # issue 12: keyed noise, CPU vs device bits, statistics, perturb time
            rec = report.setdefault("noise", {}).setdefault(arch.name, {})
            meta = bench.build_model(arch, dtype, "meta")
            shapes = [(n, tuple(p.shape)) for n, p in named_params(meta)]
            del meta
            small = args.tiny
            rec["noise"] = bench_noise.device_check(shapes, args.device, per_slice=1 << (14 if small else 20),
                                                    stats_elems=1 << (18 if small else 24))
            failures += [f"{arch.name}: {m}" for m in rec["noise"]["mismatches"]]
            failures += [f"{arch.name}: noise {k} out of bounds" for k in rec["noise"]["stats_out_of_bounds"]]
            _write(args.out, report)
            print(f"   keyed noise {arch.name}: {rec['noise']['elements_compared']} elements of "
                  f"{rec['noise']['tensors']} tensors compared with the CPU, {len(rec['noise']['mismatches'])} "
                  f"mismatches; statistics {rec['noise']['stats']}", flush=True)
            if small or "7B" in arch.name:
                t = rec["perturb"] = bench_noise.perturb_timing(shapes, args.device, dtype, args.chunk)
                t["perturb_pass"] = t["perturb_s"] < 0.1
                t["noise_pass"] = t["noise_over_randn"] >= 0.5
                _write(args.out, report)
                print(f"   perturb {t['perturb_s']:.3f}s (< 0.1s: {'PASS' if t['perturb_pass'] else 'MISS'}); "
                      f"keyed {t['keyed_elems_per_s'] / 1e9:.2f} G/s vs torch.randn "
                      f"{t['randn_elems_per_s'] / 1e9:.2f} G/s = {t['noise_over_randn']:.2f}x "
                      f"(>= 0.5x: {'PASS' if t['noise_pass'] else 'MISS'})", flush=True)
        res = bench.run(arch, dtype=dtype, device=args.device, n=args.n, prompts=args.prompts, tokens=args.tokens,
                        iterations=args.iterations, warmup=args.warmup, warmup_n=args.warmup_n,
                        chunk=args.chunk, with_baseline=not args.no_baseline)
        print(bench.table(res), flush=True)
        peak = None
        if args.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated(torch.device(args.device)) / 2**30
            print(f"   peak GPU memory {peak:.1f} GiB", flush=True)
        report.setdefault("es", {})[arch.name] = {"hpc": res.hpc, "base": res.base, "peak_gib": peak,
                                                  "rollout_tokens_per_s": res.hpc_tokens}
        _write(args.out, report)
        del res
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(torch.device(args.device))
        if args.master_updates:
            found = master_checks(arch, dtype=dtype, device=args.device, n=args.n, chunk=args.chunk,
                                  updates=args.master_updates)
            print("gpu_check master: " + json.dumps(found, sort_keys=True), flush=True)
            failed = failed or not found["ok"]
            report.setdefault("master", {})[arch.name] = found
            _write(args.out, report)
    report["wall_s"] = time.perf_counter() - t0
    _write(args.out, report)
    print(f"gpu_check: {time.perf_counter() - t0:.0f}s in all", flush=True)
    for f in failures:
        print(f"gpu_check: MISMATCH {f}", flush=True)
    failed = failed or bool(failures)
    if failed:
        print("gpu_check: MISMATCH (see above)", file=sys.stderr, flush=True)
    return 1 if failed else 0


def check_lowrank(tiny: bool, device: str) -> dict[str, Any]:
    """es.noise=lowrank (issue 14): random-init Qwen2.5-1.5B, population 256, 64 prompts x 256 new tokens,
    32 members (2048 rows) per batched pass; tokens/s of two timed passes against plain batched inference
    of the unperturbed model with the same batch (target >= 70 %).  A minute or two on an H200."""
    import bench_lowrank

    if tiny:
        r = bench_lowrank.gpu_throughput(TINY, dtype=torch.float32, device="cpu", population=8, prompts=4, tokens=8,
                                         members_per_pass=4, passes=1)
    else:
        r = bench_lowrank.gpu_throughput(ARCHS["1.5B"], dtype=torch.bfloat16, device=device)
    print(bench_lowrank.gpu_table(r), flush=True)
    return r


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
