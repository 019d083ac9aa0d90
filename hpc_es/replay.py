"""Rebuild trained weights from the base model and the ledger alone: no rollout, no checkpoint.

It reads the run_dir and checks the base model exactly as a resume does (``hpc_es.resume``), then applies
the first T recorded updates, to an fp32 master when the run had one (``es.master_dtype`` in the ledger's
config): the saved weights are then round(master), as the run's final/ is.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from hpc_es import ownership, resume
from hpc_es.checkpoint import save_model_folder
from hpc_es.config import config_from_dict
from hpc_es.errors import HpcEsError
from hpc_es.es import Replica
from hpc_es.fsio import check_model_out
from hpc_es.models import fingerprint, load_model, load_tokenizer, named_params, resolve_dtype
from hpc_es.seeds import scheme_of
from hpc_es.progress import warn
from hpc_es.search import Search
from hpc_es.search import make as make_search


class _Target:
    """One replica driven by the ledger's rows (what ``resume.replay_rows`` updates)."""

    def __init__(self, rep: Replica, search: Search) -> None:
        self.rep, self.search = rep, search

    def update(self, seeds: np.ndarray, signs: np.ndarray, shaped: np.ndarray, alpha: float) -> None:
        self.search.update([self.rep], seeds, signs, shaped, alpha)


def replay(run_dir: str, out: str, iteration: int | None = None, model: str | None = None,
           device: str = "cpu") -> str:
    """Weights after ``iteration`` completed iterations (default: all) saved to ``out``; returns the fingerprint."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise HpcEsError(f"run_dir '{run_dir}' is a file, not a run folder")
    if not os.path.isdir(run_dir):
        raise HpcEsError(f"run_dir '{run_dir}' does not exist")
    check_model_out(out)  # never replace a folder that is not an earlier hpc_es model
    ownership.require(f"{out}.old", None)  # nor remove one beside it that a save would move out's old copy to
    if os.path.realpath(out) == os.path.realpath(os.path.join(run_dir, "final")):
        raise HpcEsError(f"--out '{out}' is the run's own final model; replay into another folder")
    ledger, note = resume.read_ledger(run_dir)
    if note:
        warn(note)
    cfg = config_from_dict(ledger.config)
    cfg.es.noise_scheme = scheme_of(ledger.attrs)  # the ledger's record (none: legacy) decides
    resume.check_rows(ledger, cfg, f"cannot replay '{run_dir}'")
    total = len(ledger)
    upto = total if iteration is None else iteration
    if not 0 <= upto <= total:
        raise HpcEsError(f"--iteration {upto} is outside the ledger's 0..{total} completed iterations")
    base = model or ledger.attrs["base_model"]
    drawn_on = resume.noise_device(ledger)
    resume.check_noise_device(f"the run in '{run_dir}'", drawn_on, device.split(":")[0],
                              f"replay with --device {drawn_on}")
    dtype = resolve_dtype(ledger.attrs.get("model_dtype", cfg.dtype), device)
    net = load_model(base, dtype, device)
    resume.check_same_run(f"the run in '{run_dir}'", ledger.attrs.get("base_fingerprint"), None, cfg,
                          fingerprint(net), base, action="replay")
    # the run's distribution and noise scheme; a master beside the model (fp32 when the run had one)
    search = make_search(dataclasses.replace(cfg.es, master_on="device"))
    target = _Target(search.replica(net), search)
    resume.replay_rows(target, ledger.rows[:upto])
    bad = next((name for name, p in named_params(net) if not bool(torch.isfinite(p).all())), None)
    if bad is not None:  # as training stops before saving such weights
        raise HpcEsError(f"replaying {upto} iterations of '{run_dir}' gives non-finite weights (first in '{bad}'); "
                         f"nothing was saved to '{out}' (an earlier --iteration may still be finite)")
    save_model_folder(net, load_tokenizer(base), out)
    return fingerprint(net)
