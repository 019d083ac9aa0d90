"""Member seeds and the keys of a run's trajectory: the integers every noise draw is keyed by.

Nothing here depends on loop order, rank or shard: every seed is a hash of the run seed, the iteration and
the member's index, so any process regenerates any member's seed from three numbers.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

_MASK63 = (1 << 63) - 1
# The one chunk size legacy noise has ever been drawn with by default; under legacy it is part of the
# trajectory, so an unset (0) es.noise_chunk means this size there whatever the device.
LEGACY_CHUNK = 1 << 20


def hash64(*parts: object) -> int:
    """A non-negative 63-bit integer that is a pure function of ``parts`` (their str forms, in order)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK63


def member_seeds(run_seed: int, iteration: int, n: int, antithetic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Seeds (int64) and signs (+1/-1) of iteration ``iteration``'s ``n`` members: a pure function.

    Antithetic members 2k and 2k+1 share a seed with signs +1 and -1.
    """
    if antithetic:
        base = [hash64("member", run_seed, iteration, k) for k in range(n // 2)]
        seeds = np.repeat(np.array(base, dtype=np.int64), 2)
        signs = np.tile(np.array([1, -1], dtype=np.int8), n // 2)
    else:
        seeds = np.array([hash64("member", run_seed, iteration, k) for k in range(n)], dtype=np.int64)
        signs = np.ones(n, dtype=np.int8)
    return seeds, signs


def trajectory_keys(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The noise settings that define a run's trajectory, from a config dict (as stored in a ledger).

    A config written before ``es.noise_scheme`` existed used the legacy scheme.  Under ``keyed`` the chunk
    size changes no result, so it is no part of the trajectory."""
    es = cfg_dict.get("es", {})
    scheme = es.get("noise_scheme", "legacy")
    chunk = (es.get("noise_chunk") or LEGACY_CHUNK) if scheme == "legacy" else None
    return {"es.noise_scheme": scheme, "es.noise_chunk": chunk}


def scheme_of(attrs: dict[str, Any]) -> str:
    """The noise scheme a ledger's attrs record (none recorded: a run from before the keyed scheme)."""
    return str(attrs.get("noise_scheme", "legacy"))
