"""The ES engine: exact perturb/restore and an fp32-accumulated update, tensor by tensor.

The master weights (theta_t, the unperturbed current weights) are kept apart from the weights the model
runs with.  A perturbation writes round(master + sign*sigma*eps) into the working weights, so "restore" is
a copy of the master and is exact in every dtype (the paper's add-then-subtract in bf16 drifts).  The
update sums all members' noise in fp32 per chunk and adds it once: master <- master + (alpha/N) * sum_n
Z_n * eps_n, rounded to the master's dtype.  The master is in the model's dtype (``es.master_dtype=model``)
or in fp32 (``float32``): in bf16 an update of ~1e-4 cannot move a weight near 1.0 whose half-step is
3.9e-3, so an fp32 master lets small updates accumulate until the working weights round differently.
Replicas on one device share one master.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from hpc_es import exact
from hpc_es.errors import DistributedError
from hpc_es.models import fingerprint_named, named_params, weights_digest
from hpc_es.noise import KeyedNoise, chunks, default_chunk, noise_source

log = logging.getLogger("hpc_es")


def zscore(rewards: np.ndarray) -> np.ndarray:
    """(r - mean) / std with the population std (ddof=0), as the paper; all-equal rewards give zeros."""
    r = np.asarray(rewards, dtype=np.float64)
    std = r.std()
    if not np.isfinite(std) or std == 0.0:
        return np.zeros_like(r)
    return (r - r.mean()) / std


def centered_ranks(rewards: np.ndarray) -> np.ndarray:
    """Ranks mapped to [-0.5, 0.5]; ties share their mean rank, so all-equal rewards give zeros."""
    r = np.asarray(rewards, dtype=np.float64)
    n = len(r)
    if n == 1:
        return np.zeros(1)
    order = np.argsort(r, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, dtype=np.float64)
    for v in np.unique(r):  # average ranks of ties
        mask = r == v
        ranks[mask] = ranks[mask].mean()
    return ranks / (n - 1) - 0.5


def update_terms(seeds: np.ndarray, signs: np.ndarray, shaped: np.ndarray) -> list[tuple[int, float]]:
    """(seed, coefficient) of each noise draw the update sums, in member order: members that share a seed
    (antithetic pairs) fold into one coefficient, so each draw is generated once; zero terms are dropped."""
    coef: dict[int, float] = {}
    for s, sg, z in zip(seeds.tolist(), signs.tolist(), shaped.tolist()):
        coef[s] = coef.get(s, 0.0) + float(sg) * float(z)
    return [(s, c) for s, c in coef.items() if c != 0.0]


def shape_rewards(rewards: np.ndarray, method: str) -> np.ndarray:
    shaped = zscore(rewards) if method == "zscore" else centered_ranks(rewards)
    if len(rewards) > 1 and np.all(shaped == 0.0):
        log.warning("all %d rewards are equal (%r): this iteration's update is zero", len(rewards), rewards[0])
    return shaped


MASTER_DTYPES = ("model", "float32")


def master_torch_dtype(master_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the master is kept in: the model's (``model``) or fp32 (``float32``)."""
    if master_dtype == "model":
        return model_dtype
    if master_dtype == "float32":
        return torch.float32
    raise ValueError(f"es.master_dtype must be one of {', '.join(MASTER_DTYPES)}, got {master_dtype!r}")


@dataclass
class Replica:
    """One model copy on one device.  ``master`` maps each parameter name to its master tensor (theta_t):
    on the device or in host memory, in the model's dtype or fp32; replicas on one device share one dict."""

    model: torch.nn.Module
    device: torch.device
    params: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    master: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def wrap(cls, model: torch.nn.Module, master_on: str = "device", master_dtype: str = "model",
             share: list["Replica"] | None = None) -> "Replica":
        """Wrap ``model``; its master is copied from its weights, or is the master of a replica in ``share``
        that lives on the same device (that replica's weights must equal this one's, e.g. both just loaded)."""
        params = [(n, p.data) for n, p in named_params(model)]
        device = params[0][1].device
        for other in share or ():
            if other.device == device and [n for n, _ in other.params] == [n for n, _ in params]:
                return cls(model=model, device=device, params=params, master=other.master)
        mdtype = master_torch_dtype(master_dtype, params[0][1].dtype)
        pin = master_on == "host" and device.type == "cuda"
        master = {}
        for n, p in params:
            where = "cpu" if master_on == "host" else p.device
            m = p.detach().to(where, dtype=mdtype if p.is_floating_point() else p.dtype, copy=True)
            master[n] = m.pin_memory() if pin else m
        return cls(model=model, device=device, params=params, master=master)

    def master_fingerprint(self) -> str:
        """SHA-256 of the master (names, dtypes, shapes, bytes).  With a master in the model's dtype this
        equals ``fingerprint(model)`` after an update or a restore; with an fp32 master it covers the bits
        that rounding to the working weights would hide."""
        return fingerprint_named(sorted(self.master.items()))

    def digest(self) -> str:
        """A device-side checksum of the master and of the working weights (see models.weights_digest):
        what the cross-rank check compares, without copying the weights to the host."""
        return weights_digest([(f"master/{n}", t) for n, t in sorted(self.master.items())]
                              + [(f"working/{n}", p) for n, p in self.params])

    def load_master(self, weights: dict[str, torch.Tensor]) -> None:
        """Master <- ``weights`` (a checkpoint's, in the master's dtype or one that converts exactly) and the
        working weights <- round(master).  For replicas sharing a master, the copy into it is repeated:
        harmless, the same bits."""
        with torch.no_grad():
            for name, p in self.params:
                self.master[name].copy_(weights[name])
                p.copy_(self.master[name])


class Engine:
    """Perturb, restore and update a set of replicas that must stay bit-identical.

    Work is split into (tensor, chunk) pieces whose results depend on nothing else, so on the CPU the
    pieces run on a small thread pool (a piece's noise depends on its elements' keys only, so drawing
    chunks side by side gives the same bits as one after another).  On a GPU they run in order.
    """

    def __init__(self, chunk: int, workers: int = 0, scheme: str = "keyed") -> None:
        self.noise = noise_source(scheme, chunk)  # es.noise_scheme
        self.chunk = chunk  # es.noise_chunk; 0: noise.default_chunk of each replica's device type
        self.workers = workers  # CPU threads for noise; 0 = torch.get_num_threads() at the time of use
        self._local = threading.local()

    def _buf(self, device: torch.device, n: int, slot: object = 0) -> torch.Tensor:
        """An fp32 scratch buffer of this thread, reused across calls."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        key = (device, slot)
        b = bufs.get(key)
        if b is None or b.numel() < n:
            b = bufs[key] = torch.empty(max(n, 1), dtype=torch.float32, device=device)
        return b[:n]

    def _run(self, device: torch.device, tasks: list, fn: Callable[..., None], serial: bool = False) -> None:
        """fn(*task) for every task: on the CPU pool when there is one, else (or ``serial``) here, in order."""
        workers = self.workers or torch.get_num_threads()
        if device.type != "cpu" or workers <= 1 or len(tasks) <= 1 or serial:
            for task in tasks:
                fn(*task)
            return
        tasks = sorted(tasks, key=lambda t: t[-1] - t[-2], reverse=True)  # biggest first: even finish
        for _ in cpu_pool(workers).map(lambda t: fn(*t), tasks):
            pass

    def _fused(self, device: torch.device) -> KeyedNoise | None:
        """The keyed noise when its compiled fused kernels are to be used for this call, decided once per
        call: the pieces then run from this thread (the kernels parallelise inside, and they are built
        here, with this thread's torch thread count, never in a one-thread pool worker)."""
        return self.noise if isinstance(self.noise, KeyedNoise) and self.noise.fused_now(device) else None

    def _pieces(self, rep: Replica) -> list[tuple[str, torch.Tensor, torch.Tensor, int, int, int]]:
        chunk = default_chunk(self.chunk, self.noise.scheme, rep.device.type)
        return [(name, p.view(-1), rep.master[name].view(-1), i, s, e)
                for name, p in rep.params for i, s, e in chunks(p.numel(), chunk)]

    @torch.no_grad()
    def perturb(self, rep: Replica, seed: int, sign: int, sigma: float) -> None:
        """Working weights <- round(master + sign*sigma*eps(seed)); the master is untouched."""
        scale = float(sign) * sigma
        keyed = self._fused(rep.device)

        def piece(name: str, flat: torch.Tensor, master: torch.Tensor, i: int, s: int, e: int) -> None:
            if keyed is not None and keyed.perturb(flat[s:e], master[s:e], seed, name, s, scale):
                return  # the compiled fused kernel: the same ops in one pass, the same bits
            exact.perturb(self.noise.fill(self._buf(flat.device, e - s, "eps"), seed, name, s), scale, master[s:e],
                          flat[s:e])

        self._run(rep.device, self._pieces(rep), piece, serial=keyed is not None)

    @torch.no_grad()
    def restore(self, rep: Replica) -> None:
        """Working weights <- round(master): a copy (or one rounding of an fp32 master), so bit-exact."""
        for name, p in rep.params:
            p.copy_(rep.master[name], non_blocking=True)

    @torch.no_grad()
    def update(self, replicas: list[Replica], seeds: np.ndarray, signs: np.ndarray,
               shaped: np.ndarray, alpha: float) -> None:
        """master <- master + (alpha/N) * sum_n shaped_n*sign_n*eps(seed_n), fp32 accumulation.

        Members sharing a seed (antithetic pairs) are folded into one coefficient first.  The sum runs
        over members in a fixed order, so every rank computes identical bits.  The first replica's master
        is computed once; every other master (one per device: replicas on a device share theirs) receives
        a copy (exact), and every replica's working weights end equal to round(new master), whatever they
        held before (a perturbation, say).
        """
        n = len(shaped)
        terms = update_terms(seeds, signs, shaped)
        scale = alpha / n
        lead = replicas[0]
        masters = list({id(rep.master): rep.master for rep in replicas if rep.master is not lead.master}.values())
        workings = [dict(rep.params) for rep in replicas[1:]]
        compute = bool(terms) and scale != 0.0
        on_cpu = lead.device.type == "cpu"  # copy each chunk out while it is in cache; on a GPU, per tensor
        legacy = self.noise.scheme == "legacy"
        keyed = self._fused(lead.device)

        def piece(name: str, flat: torch.Tensor, master: torch.Tensor, i: int, s: int, e: int) -> None:
            written = False  # flat already holds round(new master)
            if compute:
                dev = flat.device
                acc = self._buf(dev, e - s, "acc")
                acc.zero_()
                # compiled fused kernels where in use: the same ops in fewer passes over memory, the same bits
                fused = keyed is not None and keyed.accumulate(acc, terms, name, s)
                if not fused:
                    eps = self._buf(dev, e - s, "eps")
                    for seed, c in terms:  # legacy runs keep their fused multiply-add (and their bits)
                        exact.accumulate(acc, self.noise.fill(eps, seed, name, s), c, fma=legacy)
                written = fused and keyed is not None and keyed.apply(acc, scale, master[s:e], flat[s:e])
                if not written:
                    exact.apply(acc, scale, master[s:e])
            if on_cpu:
                new = master[s:e]
                if not written:
                    flat[s:e].copy_(new)
                for other in masters:
                    other[name].view(-1)[s:e].copy_(new)
                for work in workings:
                    work[name].view(-1)[s:e].copy_(new)

        self._run(lead.device, self._pieces(lead), piece, serial=keyed is not None)
        if not on_cpu:
            for name, p in lead.params:
                new = lead.master[name]
                p.copy_(new)
                for other in masters:
                    other[name].copy_(new)
                for work in workings:
                    work[name].copy_(new)


def _one_thread() -> None:
    # Under OpenMP the thread count is a per-thread setting: this worker's ops run single-threaded (the
    # pool is the parallelism) while the caller keeps its own.  Other backends share one global setting.
    if "OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(1)


class CpuPools:
    """Thread pools by size.  One instance serves the process (``cpu_pool``): a pool's threads are idle
    between calls and hold only scratch buffers, so every engine shares them."""

    def __init__(self) -> None:
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def get(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            pool = self._pools.get(workers)
            if pool is None:
                pool = self._pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="hpc_es-noise",
                                                                 initializer=_one_thread)
            return pool


_PROCESS_POOLS = CpuPools()


def cpu_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` threads for noise pieces."""
    return _PROCESS_POOLS.get(workers)


class WeightsNotFinite(DistributedError):
    """An update made a weight inf or NaN.  Every rank holds the same weights and so hits it alike: it
    is reported once (as a DistributedError is), with the exit code of a user error (the step size)."""

    exit_code = 2


@torch.no_grad()
def check_finite(rep: Replica, t: int, alpha: float, sigma: float) -> None:
    """Raise WeightsNotFinite when any of ``rep``'s master weights is inf or NaN after iteration ``t``.

    One fp32-accumulated sum per tensor (no copy of the weights), one host sync per device: an inf or
    NaN anywhere makes its tensor's sum non-finite.  (A finite sum can overflow only for weights near
    the fp32 limit, which are broken anyway.)  Called after each update, before anything is saved.
    """
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for _, p in rep.params:
        sums.setdefault(p.device, []).append(torch.sum(p, dtype=torch.float32))
    if all(bool(torch.isfinite(torch.stack(s)).all()) for s in sums.values()):
        return
    bad = next(name for name, p in rep.params if not bool(torch.isfinite(p).all()))
    raise WeightsNotFinite(
        f"iteration {t} made the weights non-finite (first in '{bad}'; es.alpha={alpha:g}, es.sigma={sigma:g}); "
        f"stopped before saving them (log.h5 holds the {t} iterations before it); lower es.alpha or es.sigma in a "
        "new run_dir (earlier weights: `python -m hpc_es replay RUN_DIR --iteration T --out DIR`)")
