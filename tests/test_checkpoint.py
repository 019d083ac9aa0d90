"""Checkpoints: atomic save (a failure mid-write leaves the previous one), load, damage detection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hpc_es import checkpoint as ckpt
from hpc_es.fsio import FileSystemError
from hpc_es.ledger import Ledger

from test_ledger import make


def state(it: int, has_weights: bool = True) -> ckpt.CheckpointState:
    return ckpt.CheckpointState(iteration=it, base_model="/m", base_fingerprint="b" * 64, fingerprint=f"{it:064d}",
                                has_weights=has_weights, config=json.dumps({"seed": 1}))


def weights(v: float) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((3, 4), v), "b.bias": torch.arange(5, dtype=torch.bfloat16) + v}


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p for p in os.listdir(run_dir) if p != "checkpoint")


def test_round_trip_with_weights_and_ledger_copy(tmp_path: Path) -> None:
    ckpt.save(str(tmp_path), state(2), weights(1.0), ledger=make(2))
    found = ckpt.load(str(tmp_path))
    assert found is not None
    st, folder = found
    assert st == state(2)
    w = ckpt.load_weights(folder)
    for k, v in weights(1.0).items():
        assert w[k].dtype == v.dtype and torch.equal(w[k], v)
    copy = ckpt.ledger_copy(folder)
    assert copy is not None and len(Ledger.load(copy)) == 2
    assert leftovers(tmp_path) == []


def test_ledger_only_checkpoint(tmp_path: Path) -> None:
    ckpt.save(str(tmp_path), state(3, has_weights=False), None, ledger=make(3))
    st, folder = ckpt.load(str(tmp_path))
    assert not st.has_weights
    assert sorted(os.listdir(folder)) == [ckpt.LEDGER, ckpt.STATE]


def test_empty_run_dir_has_no_checkpoint(tmp_path: Path) -> None:
    assert ckpt.load(str(tmp_path)) is None


def test_newer_checkpoint_replaces_older(tmp_path: Path) -> None:
    ckpt.save(str(tmp_path), state(1), weights(1.0))
    ckpt.save(str(tmp_path), state(2), weights(2.0))
    st, folder = ckpt.load(str(tmp_path))
    assert st.iteration == 2 and torch.equal(ckpt.load_weights(folder)["a.weight"], weights(2.0)["a.weight"])
    assert leftovers(tmp_path) == []


def test_failure_during_weights_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    ckpt.save(str(tmp_path), state(1), weights(1.0))

    def dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with pytest.raises(FileSystemError, match="cannot write the checkpoint .*: disk full"):  # one line, exit 2
        ckpt.save(str(tmp_path), state(2), weights(2.0))
    assert not list(tmp_path.glob("checkpoint.tmp-*"))
    monkeypatch.undo()
    st, folder = ckpt.load(str(tmp_path))
    assert st.iteration == 1 and torch.equal(ckpt.load_weights(folder)["a.weight"], weights(1.0)["a.weight"])


def test_kill_before_state_is_written_keeps_previous(tmp_path: Path) -> None:
    """The fault hook sits between the weights and state.json: a kill there leaves a temp folder only."""
    ckpt.save(str(tmp_path), state(1), weights(1.0))

    def kill(point: str) -> None:
        assert point == "checkpoint_write"
        raise KeyboardInterrupt  # stands in for SIGKILL

    with pytest.raises(KeyboardInterrupt):
        ckpt.save(str(tmp_path), state(2), weights(2.0), fault=kill)
    assert any(p.startswith("checkpoint.tmp-") for p in leftovers(tmp_path))
    assert ckpt.load(str(tmp_path))[0].iteration == 1
    assert ckpt.clean_stale(str(tmp_path))
    assert leftovers(tmp_path) == []


def test_kill_between_the_renames_falls_back_to_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt.save(str(tmp_path), state(1), weights(1.0))
    real, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("killed")
        real(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(FileSystemError, match="cannot write the checkpoint .*: killed"):
        ckpt.save(str(tmp_path), state(2), weights(2.0))
    assert not list(tmp_path.glob("checkpoint.tmp-*"))
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint").exists() and (tmp_path / "checkpoint.old").is_dir()
    st, folder = ckpt.load(str(tmp_path))
    assert st.iteration == 1 and folder.endswith("checkpoint.old")
    ckpt.save(str(tmp_path), state(2), weights(2.0))  # the next save cleans up
    assert ckpt.load(str(tmp_path))[0].iteration == 2


@pytest.mark.parametrize("text", ["", '{"iteration": 2, "base', "[1, 2]", '{"iteration": 2}',
                                  '{"iteration": -1, "base_model": "", "base_fingerprint": "", "fingerprint": "", '
                                  '"has_weights": false}',
                                  '{"iteration": "2", "base_model": "", "base_fingerprint": "", "fingerprint": "", '
                                  '"has_weights": false}'])
def test_damaged_state_is_a_checkpoint_error(tmp_path: Path, text: str) -> None:
    ckpt.save(str(tmp_path), state(2), weights(1.0))
    (tmp_path / "checkpoint" / ckpt.STATE).write_text(text)
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load(str(tmp_path))


def test_state_without_config_still_loads(tmp_path: Path) -> None:
    ckpt.save(str(tmp_path), state(2, has_weights=False), None)
    path = tmp_path / "checkpoint" / ckpt.STATE
    d = json.loads(path.read_text())
    del d["config"]
    path.write_text(json.dumps(d))
    assert ckpt.load(str(tmp_path))[0].config == ""


def test_missing_or_truncated_weights(tmp_path: Path) -> None:
    ckpt.save(str(tmp_path), state(2), weights(1.0))
    path = tmp_path / "checkpoint" / ckpt.WEIGHTS
    os.truncate(path, path.stat().st_size // 2)
    _, folder = ckpt.load(str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_weights(folder)
    os.remove(path)
    with pytest.raises(ckpt.CheckpointError, match="lacks"):
        ckpt.load(str(tmp_path))
