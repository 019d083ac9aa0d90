"""What hpc_es may replace or remove: only what it wrote itself.

A save replaces a folder by rename and removes the one it replaced, and a resume removes what a killed
writer left behind.  Each of those folders is checked first.  A model folder (``final/``, a replay's
``--out``, their ``.old`` and ``.tmp-PID``) is ours when it carries ``MODEL_MARKER``, which a save writes
before anything else; a checkpoint or TensorBoard folder is ours when every entry in it is a name hpc_es
writes there.  An empty folder holds nothing to lose.  A symbolic link is never ours: a run_dir handed
over by someone else cannot point a write or a removal outside itself.

``check_run_dir`` runs on rank 0 before the model loads, so a folder that is not ours stops the run with
one line naming it, before minutes of work and before anything is touched.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shutil

from hpc_es.fsio import MODEL_MARKER, FileSystemError

# The names hpc_es writes into its folders (fnmatch patterns); None: a model folder, known by its marker.
CHECKPOINT_NAMES = ("state.json", "model.safetensors", "log.h5", "log.h5.tmp")
TENSORBOARD_NAMES = ("events.out.tfevents.*",)
# The plain files hpc_es writes in run_dir; each must be a file, never a link.
OWN_FILES = (".lock", "log.h5", "log.h5.tmp", "log.h5.damaged", ".hpc_es-summary")


class NotOurs(FileSystemError):
    """A path hpc_es would replace or remove holds something it did not write."""


def foreign_entry(path: str, names: tuple[str, ...] | None) -> str | None:
    """Why ``path`` is not ours to replace ("" for the path itself), or None when it is ours (or absent)."""
    if not os.path.lexists(path):
        return None
    if os.path.islink(path) or not os.path.isdir(path):
        return ""
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        return ""
    if names is None:
        return None if not entries or MODEL_MARKER in entries else entries[0]
    for entry in entries:
        full = os.path.join(path, entry)
        if os.path.islink(full) or not any(fnmatch.fnmatchcase(entry, p) for p in names):
            return entry
    return None


def require(path: str, names: tuple[str, ...] | None) -> None:
    """Raise ``NotOurs`` naming ``path`` (and what in it is foreign) unless hpc_es may replace it."""
    bad = foreign_entry(path, names)
    if bad is None:
        return
    if bad == "":
        what = "is a link or a file, not a folder hpc_es wrote"
    else:
        what = f"holds '{bad[:200]}', which hpc_es did not write"
    raise NotOurs(f"'{path}' {what}; refusing to replace or remove it (move it out of the way)")


def remove(path: str, names: tuple[str, ...] | None) -> None:
    """Remove a folder of ours; absent is fine, one that is not ours is refused."""
    require(path, names)
    shutil.rmtree(path, ignore_errors=True)


def _family(run_dir: str, name: str) -> list[str]:
    base = os.path.join(run_dir, name)
    pattern = glob.escape(base)
    return [base, f"{base}.old"] + sorted(glob.glob(f"{pattern}.tmp-*") + glob.glob(f"{pattern}.old-*"))


def check_run_dir(run_dir: str, tensorboard: bool) -> None:
    """Rank 0, before the model loads: everything in ``run_dir`` that this run may replace is ours."""
    for name in OWN_FILES:
        path = os.path.join(run_dir, name)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
            raise NotOurs(f"'{path}' is a link or not a plain file; hpc_es writes its own file there and "
                          "refuses to follow or replace it (move it out of the way)")
    folders: list[tuple[str, tuple[str, ...] | None]] = [("final", None), ("checkpoint", CHECKPOINT_NAMES)]
    if tensorboard:
        folders.append(("tensorboard", TENSORBOARD_NAMES))
    for name, names in folders:
        for path in _family(run_dir, name):
            require(path, names)
