"""The HDF5 ledger: layout, round trip, atomic rewrite, damaged files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_es.ledger import MATRIX, SCALARS, Ledger, LedgerError

N = 4


def row(t: int) -> dict:
    rng = np.random.default_rng(t)
    r = {"iteration": t, "seeds": rng.integers(0, 2**62, N, dtype=np.int64),
         "signs": np.array([1, -1] * (N // 2), np.int8),
         "rewards": rng.normal(size=N), "shaped": rng.normal(size=N)}
    for key in SCALARS:
        r.setdefault(key, float(t) + 0.5 if SCALARS[key] == np.float64 else t + 1)
    return r


def make(n: int, config: dict | None = None) -> Ledger:
    led = Ledger(N, {"config": json.dumps(config or {"seed": 3}), "base_fingerprint": "ab" * 32})
    for t in range(n):
        led.append(row(t))
    return led


def test_layout_dtypes_shapes_and_config_attribute(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    make(3, {"seed": 7, "es": {"sigma": 0.1}}).save(str(path))
    with h5py.File(path, "r") as f:
        assert f["seeds"].dtype == np.int64 and f["seeds"].shape == (3, N)
        assert f["signs"].dtype == np.int8 and f["signs"].shape == (3, N)
        assert f["rewards"].dtype == np.float64 and f["rewards"].shape == (3, N)
        assert f["shaped"].dtype == np.float64 and f["shaped"].shape == (3, N)
        for key, dtype in SCALARS.items():
            assert f[key].shape == (3,), key
            assert f[key].dtype == dtype, key
        assert f["iteration"][()].tolist() == [0, 1, 2]
        cfg = f.attrs["config"]
        assert json.loads(cfg.decode() if isinstance(cfg, bytes) else cfg) == {"seed": 7, "es": {"sigma": 0.1}}


def test_round_trip_is_exact(tmp_path: Path) -> None:
    path = str(tmp_path / "log.h5")
    led = make(5)
    led.events.append({"iteration": 2, "event": "note", "detail": "x"})
    led.save(path)
    back = Ledger.load(path)
    assert len(back) == 5 and back.population == N
    assert back.config == {"seed": 3}
    assert back.attrs["base_fingerprint"] == "ab" * 32
    assert back.events == led.events
    for key in list(MATRIX) + list(SCALARS):
        np.testing.assert_array_equal(back.column(key), led.column(key), err_msg=key)
    back.append(row(5))  # a loaded ledger continues
    assert len(back) == 6


def test_a_ledger_with_the_retired_time_restore_column_still_loads_and_continues(tmp_path: Path) -> None:
    """Earlier releases wrote a time_restore column (always 0); it is ignored, and the next save drops it."""
    path = str(tmp_path / "log.h5")
    led = make(3)
    led.save(path)
    with h5py.File(path, "r+") as f:
        f.create_dataset("time_restore", data=np.zeros(3))
    back = Ledger.load(path)
    assert "time_restore" not in SCALARS and all("time_restore" not in r for r in back.rows)
    for key in list(MATRIX) + list(SCALARS):
        np.testing.assert_array_equal(back.column(key), led.column(key), err_msg=key)
    back.append(row(3))
    back.save(path)
    with h5py.File(path, "r") as f:
        assert "time_restore" not in f and f["iteration"][()].tolist() == [0, 1, 2, 3]


def test_empty_ledger_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "log.h5")
    make(0).save(path)
    back = Ledger.load(path)
    assert len(back) == 0 and back.population == N


def test_append_checks_order_and_fields() -> None:
    led = make(2)
    with pytest.raises(ValueError, match="iteration 3 after 1"):
        led.append(row(3))
    bad = row(2)
    del bad["shaped"]
    with pytest.raises(ValueError, match="shaped"):
        led.append(bad)
    led.append(row(2))
    assert len(led) == 3


def test_failed_rewrite_leaves_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "log.h5")
    make(2).save(path)
    before = open(path, "rb").read()
    led = make(3)
    real = Ledger.column

    def failing(self, key):  # the write dies half-way through the datasets
        if key == "reward_max":
            raise OSError("disk full")
        return real(self, key)

    monkeypatch.setattr(Ledger, "column", failing)
    with pytest.raises(OSError, match="disk full"):
        led.save(path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert len(Ledger.load(path)) == 2
    led.save(path)  # the leftover temp file does not get in the way
    assert len(Ledger.load(path)) == 3 and not os.path.exists(path + ".tmp")


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9])
def test_truncated_file_is_a_ledger_error(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "log.h5"
    make(3).save(str(path))
    os.truncate(path, int(path.stat().st_size * keep))
    with pytest.raises(LedgerError, match="unreadable or incomplete"):
        Ledger.load(str(path))


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    path.write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(LedgerError, match="unreadable"):
        Ledger.load(str(path))
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger.load(str(tmp_path / "nope.h5"))


def test_missing_dataset_or_inconsistent_rows(tmp_path: Path) -> None:
    path = tmp_path / "log.h5"
    make(3).save(str(path))
    with h5py.File(path, "a") as f:
        del f["shaped"]
    with pytest.raises(LedgerError, match="shaped"):
        Ledger.load(str(path))
    make(3).save(str(path))
    with h5py.File(path, "a") as f:
        f["rewards"].resize((2, N))
    with pytest.raises(LedgerError, match="'rewards' has 2 rows"):
        Ledger.load(str(path))
    make(3).save(str(path))
    with h5py.File(path, "a") as f:
        f["iteration"][1] = 5
    with pytest.raises(LedgerError, match="iterations are not 0..2"):
        Ledger.load(str(path))


def test_missing_config_attribute_is_a_ledger_error(tmp_path: Path) -> None:
    path = str(tmp_path / "log.h5")
    led = make(1)
    del led.attrs["config"]
    led.save(path)
    with pytest.raises(LedgerError, match="config"):
        _ = Ledger.load(path).config
