"""``python -m hpc_es``: train (default), eval, fingerprint, replay, submit, report, fetch.

User errors end with one line ``hpc_es: error: ...`` and a non-zero exit; a rank that fails names itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

USAGE = """usage: python -m hpc_es [--config FILE] [key=value ...]          train
       python -m hpc_es eval [--config FILE] [key=value ...]     mean reward / accuracy on the test split
       python -m hpc_es fingerprint DIR                           SHA-256 of a model's parameters
       python -m hpc_es replay RUN_DIR [--iteration T] --out DIR  rebuild weights from the ledger
       python -m hpc_es submit [--config FILE] [key=value ...] [--nodes N] [--gpus-per-node G] ...
       python -m hpc_es report RUN_DIR [RUN_DIR ...] [--out DIR]  figures and a summary from the ledger(s)
       python -m hpc_es fetch smollm2 [--out DIR]                 a real pretrained model from the registry
"""


def _config_args(argv: list[str], prog: str) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog=prog, usage=USAGE)
    p.add_argument("--config", "-c", default=None, help="YAML config file")
    return p.parse_known_args(argv)


def _config_and_comm(argv: list[str], prog: str) -> tuple[Any, Any]:
    """The checked config, then the communicator of this launch (a config error is the same on every
    rank: the launcher's rank 0 alone reports it)."""
    from hpc_es.comm import launcher_rank, make_comm
    from hpc_es.config import load_config
    from hpc_es.errors import HpcEsError

    args, overrides = _config_args(argv, prog)
    try:
        _bad_flags(overrides)
        cfg = load_config(args.config, overrides)
    except HpcEsError as e:
        e.quiet = launcher_rank() not in (None, 0)
        raise
    comm = make_comm(cfg.dist.backend, cfg.dist.timeout_s)
    _RANK[0] = comm.rank
    return cfg, comm


def cmd_train(argv: list[str]) -> int:
    from hpc_es.runner import EXIT_REQUEUE, run_training
    from hpc_es.trainer import Stop

    cfg, comm = _config_and_comm(argv, "python -m hpc_es")
    try:
        result = run_training(cfg, comm, own_process=True)
    except Stop:
        return EXIT_REQUEUE
    if comm.is_main:
        print(json.dumps({"run_dir": result["run_dir"], "final": result["final_dir"],
                          "iterations": result["iterations"], "fingerprint": result["fingerprint"],
                          "reward_mean_first": _finite(result["reward_mean_first"]),
                          "reward_mean_last": _finite(result["reward_mean_last"])}), flush=True)
    return 0


def _finite(x: float) -> float | None:
    """NaN (no iteration ran) as JSON null: strict parsers reject NaN.  (issue 16)"""
    return x if x == x and abs(x) != float("inf") else None


def _bad_flags(rest: list[str]) -> None:
    from hpc_es.errors import ConfigError

    flags = [a for a in rest if a.startswith("-")]
    if flags:
        raise ConfigError(f"unknown option {flags[0]}; settings are given as key=value (e.g. es.sigma=0.01)")


def cmd_eval(argv: list[str]) -> int:
    from hpc_es.evaluate import evaluate
    from hpc_es.runner import leave_together

    cfg, comm = _config_and_comm(argv, "python -m hpc_es eval")
    try:
        out = evaluate(cfg, comm=comm)
    except BaseException as e:
        leave_together(comm, e, exit_process=True)
        raise
    if comm.is_main:
        print(json.dumps(out), flush=True)
    comm.barrier()  # nobody tears the process group down under a rank that is still in it
    comm.close()
    return 0


def cmd_fingerprint(argv: list[str]) -> int:
    from hpc_es.models import fingerprint_dir

    p = argparse.ArgumentParser(prog="python -m hpc_es fingerprint")
    p.add_argument("dir")
    args = p.parse_args(argv)
    print(fingerprint_dir(args.dir))
    return 0


def cmd_replay(argv: list[str]) -> int:
    from hpc_es.replay import replay

    p = argparse.ArgumentParser(prog="python -m hpc_es replay")
    p.add_argument("run_dir")
    p.add_argument("--iteration", type=int, default=None, help="completed iterations to replay (default: all)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="base model folder (default: the one the ledger names)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    fp = replay(args.run_dir, args.out, args.iteration, args.model, args.device)
    print(json.dumps({"out": args.out, "fingerprint": fp}))
    return 0


def cmd_submit(argv: list[str]) -> int:
    from hpc_es.launch import submit_main

    return submit_main(argv)


def cmd_report(argv: list[str]) -> int:  # issue 15
    from hpc_es.report import main as report_main

    return report_main(argv)


def cmd_fetch(argv: list[str]) -> int:
    from hpc_es.fetch import main as fetch_main

    return fetch_main(argv)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "fingerprint": cmd_fingerprint, "replay": cmd_replay,
            "submit": cmd_submit, "report": cmd_report, "fetch": cmd_fetch}  # issue 15: report
_RANK = [0]


def main(argv: list[str] | None = None) -> int:
    from hpc_es.errors import HpcEsError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv and not argv[0].startswith("-") and "=" not in argv[0] and argv[0] not in COMMANDS:  # issue 16
        hint = f"; for a config file use --config {argv[0]}" if argv[0].endswith((".yaml", ".yml")) else ""
        print(f"hpc_es: error: unknown command '{argv[0]}'; the commands are {', '.join(COMMANDS)} (train is the "
              f"default; settings are given as key=value){hint}", file=sys.stderr, flush=True)
        return 2
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    try:
        from hpc_es.runner import quiet_libraries

        quiet_libraries()
        return COMMANDS[cmd](argv)
    except HpcEsError as e:
        who = f"rank {_RANK[0]}: " if _RANK[0] else ""
        if not getattr(e, "quiet", False):
            print(f"hpc_es: error: {who}{e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("hpc_es: interrupted", file=sys.stderr)
        return 130
