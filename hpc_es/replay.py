"""Rebuild trained weights from the base model and the ledger alone: no rollout, no checkpoint."""

from __future__ import annotations

import os
import sys

import numpy as np

from hpc_es.config import config_from_dict
from hpc_es.errors import HpcEsError
from hpc_es.es import Engine, Replica
from hpc_es.ledger import Ledger, LedgerError
from hpc_es.models import fingerprint, load_model, load_tokenizer, resolve_dtype
from hpc_es.noise import scheme_of


def replay(run_dir: str, out: str, iteration: int | None = None, model: str | None = None,
           device: str = "cpu") -> str:
    """Weights after ``iteration`` completed iterations (default: all) saved to ``out``; returns the fingerprint."""
    from hpc_es.trainer import save_pretrained_atomic

    if not os.path.isdir(run_dir):
        raise HpcEsError(f"run_dir '{run_dir}' does not exist")
    try:
        ledger = Ledger.load(os.path.join(run_dir, "log.h5"))
    except LedgerError as e:  # fall back to the copy of the ledger the checkpoint keeps
        copy = os.path.join(run_dir, "checkpoint", "log.h5")
        if not os.path.isfile(copy):
            raise
        try:
            ledger = Ledger.load(copy)
        except LedgerError:
            raise e from None
        print(f"hpc_es: warning: {e}; replaying from the checkpoint's copy of the ledger "
              f"({len(ledger)} iterations)", file=sys.stderr, flush=True)
    cfg = config_from_dict(ledger.config)
    total = len(ledger)
    upto = total if iteration is None else iteration
    if not 0 <= upto <= total:
        raise HpcEsError(f"--iteration {upto} is outside the ledger's 0..{total} completed iterations")
    base = model or ledger.attrs["base_model"]
    scheme = scheme_of(ledger.attrs)  # issue 12: keyed noise replays on any device; legacy on the same kind
    if scheme == "legacy" and ledger.attrs.get("noise_device", "cpu") != device.split(":")[0]:
        raise HpcEsError(f"the run drew its noise on {ledger.attrs.get('noise_device')}; replay with "
                         f"--device {ledger.attrs.get('noise_device')} (CPU and CUDA generators differ)")
    dtype = resolve_dtype(ledger.attrs.get("model_dtype", cfg.dtype), device)
    net = load_model(base, dtype, device)
    found = fingerprint(net)
    if found != ledger.attrs["base_fingerprint"]:
        raise HpcEsError(f"base model '{base}' has fingerprint {found[:16]} but the run started from "
                         f"{str(ledger.attrs['base_fingerprint'])[:16]}; refusing to replay onto another model")
    rep = Replica.wrap(net, "device")
    engine = Engine(cfg.es.noise_chunk, scheme=scheme)  # issue 12
    for row in ledger.rows[:upto]:
        engine.update([rep], np.asarray(row["seeds"]), np.asarray(row["signs"]),
                      np.asarray(row["shaped"]), float(row["alpha"]))
    save_pretrained_atomic(net, load_tokenizer(base), out)
    return fingerprint(net)
