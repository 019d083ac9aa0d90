#!/usr/bin/env python
"""GPU check: tools/bench.py's table for randomly initialised Qwen2.5-1.5B and Qwen2.5-7B architectures.

bf16, N=30, 16 prompts x 32 new tokens, one timed iteration of hpc_es and of the published-code baseline
each (after a 2-member warm-up), on one GPU; meant to finish within 8 minutes on an H100/H200.  The
architectures are written out below (no download); the tokenizer is hpc_es's tiny one, so most sampled
ids of the 151936-entry vocabulary decode to nothing, which changes no cost that is timed.

    .venv/bin/python tools/gpu_check.py                 # both models on cuda
    .venv/bin/python tools/gpu_check.py --only 1.5B --chunk 67108864
    .venv/bin/python tools/gpu_check.py --tiny          # the same script on CPU, tiny architecture

First, per model, the keyed noise: CUDA against CPU bit for bit on a sample of the model's tensors, its
statistics on the GPU, and a whole-model perturb timed (tools/bench_noise.py).  Results go to --json after
every phase; the exit status is 1 when any noise bit or statistic is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: model building, both implementations, limits, the table)
import bench_noise  # noqa: E402  (tools/bench_noise.py: keyed noise checks and timings)
from hpc_es.models import named_params  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="run on CPU with a tiny architecture (a dry run)")
    ap.add_argument("--only", choices=sorted(ARCHS), action="append", help="run only this model (repeatable)")
    bench.add_args(ap)
    ap.set_defaults(dtype="bfloat16", device="cuda", n=30, prompts=16, tokens=32, iterations=1, warmup=1)
    ap.add_argument("--warmup-n", type=int, default=2, help="members per warm-up iteration")
    ap.add_argument("--json", default="gpu_check.json", help="results file, rewritten after every phase")
    ap.add_argument("--no-noise", action="store_true", help="skip the keyed noise checks")
    ap.set_defaults(chunk=1 << 26)  # keyed noise: the chunk changes no bit; big pieces keep the GPU busy
    ap.add_argument("--no-lowrank", action="store_true", help="skip the low-rank population throughput check")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device = "cpu"
        archs = [TINY]
    else:
        if not torch.cuda.is_available() and args.device.startswith("cuda"):
            print("gpu_check: torch sees no GPU (use --tiny for a CPU dry run)", file=sys.stderr)
            return 2
        archs = [ARCHS[k] for k in (args.only or ["1.5B", "7B"])]
    dtype = bench.resolve(args)
    t0 = time.perf_counter()
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(torch.device(args.device))}, torch {torch.__version__}",
              flush=True)
    out: dict = {"device": args.device, "torch": torch.__version__, "models": {}}
    failures: list[str] = []

    def save() -> None:
        with open(args.json, "w") as f:
            json.dump(out | {"failures": failures}, f, indent=1)

    for arch in archs:
        if not args.no_noise:  # issue 12: keyed noise, CPU vs device bits, statistics, perturb time
            rec = out["models"].setdefault(arch.name, {})
            meta = bench.build_model(arch, dtype, "meta")
            shapes = [(n, tuple(p.shape)) for n, p in named_params(meta)]
            del meta
            small = args.tiny
            rec["noise"] = bench_noise.device_check(shapes, args.device, per_slice=1 << (14 if small else 20),
                                                    stats_elems=1 << (18 if small else 24))
            failures += [f"{arch.name}: {m}" for m in rec["noise"]["mismatches"]]
            failures += [f"{arch.name}: noise {k} out of bounds" for k in rec["noise"]["stats_out_of_bounds"]]
            save()
            print(f"   keyed noise {arch.name}: {rec['noise']['elements_compared']} elements of "
                  f"{rec['noise']['tensors']} tensors compared with the CPU, {len(rec['noise']['mismatches'])} "
                  f"mismatches; statistics {rec['noise']['stats']}", flush=True)
            if small or "7B" in arch.name:
                t = rec["perturb"] = bench_noise.perturb_timing(shapes, args.device, dtype, args.chunk)
                t["perturb_pass"] = t["perturb_s"] < 0.1
                t["noise_pass"] = t["noise_over_randn"] >= 0.5
                save()
                print(f"   perturb {t['perturb_s']:.3f}s (< 0.1s: {'PASS' if t['perturb_pass'] else 'MISS'}); "
                      f"keyed {t['keyed_elems_per_s'] / 1e9:.2f} G/s vs torch.randn "
                      f"{t['randn_elems_per_s'] / 1e9:.2f} G/s = {t['noise_over_randn']:.2f}x "
                      f"(>= 0.5x: {'PASS' if t['noise_pass'] else 'MISS'})", flush=True)
        res = bench.run(arch, dtype=dtype, device=args.device, n=args.n, prompts=args.prompts, tokens=args.tokens,
                        iterations=args.iterations, warmup=args.warmup, warmup_n=args.warmup_n,
                        chunk=args.chunk, with_baseline=not args.no_baseline)
        print(bench.table(res), flush=True)
        out["models"].setdefault(arch.name, {})["bench"] = {"hpc_es": res.hpc, "baseline": res.base,
                                                             "table": bench.table(res)}
        save()
        if args.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated(torch.device(args.device)) / 2**30
            print(f"   peak GPU memory {peak:.1f} GiB", flush=True)
        del res
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(torch.device(args.device))
    if not args.no_lowrank:
        check_lowrank(args.tiny, args.device)
    print(f"gpu_check: {time.perf_counter() - t0:.0f}s in all", flush=True)
    for f in failures:
        print(f"gpu_check: MISMATCH {f}", flush=True)
    return 1 if failures else 0


def check_lowrank(tiny: bool, device: str) -> None:
    """es.noise=lowrank (issue 14): random-init Qwen2.5-1.5B, population 256, 64 prompts x 256 new tokens,
    32 members (2048 rows) per batched pass; tokens/s of two timed passes against plain batched inference
    of the unperturbed model with the same batch (target >= 70 %).  About a minute on an H200."""
    import bench_lowrank

    if tiny:
        r = bench_lowrank.gpu_throughput(TINY, dtype=torch.float32, device="cpu", population=8, prompts=4, tokens=8,
                                         members_per_pass=4, passes=1)
    else:
        r = bench_lowrank.gpu_throughput(ARCHS["1.5B"], dtype=torch.bfloat16, device=device)
    print(bench_lowrank.gpu_table(r), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
