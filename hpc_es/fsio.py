"""File-system edges a user or a cluster can get wrong: oversized or odd input files, output folders that
already hold something, and OS errors (a full disk, a read-only mount) turned into one line each.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
from collections.abc import Iterator

from hpc_es.errors import HpcEsError

MAX_DATA_BYTES = 1 << 30  # a data file is read whole into memory: refuse /dev/zero or a mistaken multi-GB file
MODEL_MARKER = ".hpc_es-model"  # written into every model folder hpc_es saves, so it may be replaced later


class FileSystemError(HpcEsError):
    """A path cannot be written or read for a reason outside hpc_es (permissions, a full disk, a file in
    the way).  Nothing already saved is touched by the failing write: the message says so."""


def read_text_file(path: str, what: str, max_bytes: int, error: type[HpcEsError] = HpcEsError) -> str:
    """A regular UTF-8 file's text, or one ``error`` line naming ``path`` and the cause.

    The size is checked before reading, so a device (``/dev/zero``), a FIFO or a huge file is refused at
    once instead of filling memory.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist") from None
    except OSError as e:
        raise error(f"{what} '{path}' cannot be read: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} '{path}' is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} '{path}' is not a regular file")
    if st.st_size > max_bytes:
        raise error(f"{what} '{path}' is {st.st_size:,} bytes, more than the {max_bytes:,} allowed")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{what} '{path}' cannot be read: {e.strerror}") from None
    if len(raw) > max_bytes:
        raise error(f"{what} '{path}' is more than the {max_bytes:,} bytes allowed")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} '{path}' is not UTF-8 text: {e.reason} at byte {e.start}") from None


def describe_os_error(e: OSError, path: str | None = None) -> str:
    """``'<path>': <cause>`` for an OSError, with the advice a full disk needs."""
    where = path or e.filename or "?"
    cause = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"'{where}': {cause}; nothing was lost; free space and rerun to resume"
    return f"'{where}': {cause}"


def as_os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, or one rebuilt from a library's text ("... (os error 28)", as
    safetensors reports a full disk).  None when ``e`` is not a file-system failure."""
    if isinstance(e, OSError):
        return e
    found = re.search(r"os error (\d+)", str(e))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def create_new(path: str) -> int:
    """A descriptor of a new file at ``path`` (a temporary of hpc_es's own): whatever was there (a kill's
    leftover, or a symbolic link in a run_dir handed over by someone) is unlinked, never followed, and the
    file is created exclusively, so a write can only land in run_dir itself."""
    if os.path.lexists(path) and not os.path.isdir(path):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


@contextlib.contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """Hold an flock on ``folder`` itself (waiting for another holder): two saves into one folder (two
    replays to one ``--out``) take turns instead of interleaving their renames.  Best effort where the file
    system has no flock."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    """Flush a file (or a folder's entries, which makes a rename inside it durable) to disk; best effort
    where the OS refuses to open or sync a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes | memoryview) -> None:
    """Replace ``path`` with ``data`` so that a kill or a crash leaves the old file or the new one whole:
    written to ``path.tmp`` (created new, never through a link: see create_new), fsynced, renamed over
    ``path``, and the rename itself fsynced.  An OSError (a full disk, a read-only mount) removes the
    temporary file and propagates; ``path`` is then untouched."""
    tmp = f"{path}.tmp"
    try:
        with os.fdopen(create_new(tmp), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))


def check_writable_dir(path: str, what: str = "run_dir") -> None:
    """Create ``path`` if needed and prove it writable (a probe file), before anything slow happens."""
    if os.path.islink(path) and not os.path.exists(path):
        raise FileSystemError(f"{what} '{path}' is a symbolic link to '{os.readlink(path)}', which does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileSystemError(f"{what} '{path}' is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".hpc_es-probe-{os.getpid()}")
        os.close(create_new(probe))
        os.remove(probe)
    except OSError as e:
        raise FileSystemError(f"{what} {describe_os_error(e, path)}") from None


def check_model_out(out: str) -> None:
    """Refuse an output folder that holds anything but an earlier hpc_es model (before any work is done).

    Saving a model replaces the folder by rename, so a folder given by mistake (a run_dir, a home
    directory) would be deleted: only a missing or empty folder, or one that carries ``MODEL_MARKER``,
    may be replaced.
    """
    if not os.path.lexists(out):
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise FileSystemError(f"output folder '{out}': its parent folder '{parent}' does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise FileSystemError(f"output folder '{out}': its parent folder '{parent}' is not writable")
        return
    if not os.path.isdir(out) or os.path.islink(out):
        raise FileSystemError(f"output folder '{out}' exists and is not a folder; give a new or empty folder")
    try:
        entries = os.listdir(out)
    except OSError as e:
        raise FileSystemError(f"output folder {describe_os_error(e, out)}") from None
    if entries and MODEL_MARKER not in entries:
        raise FileSystemError(
            f"output folder '{out}' is not empty and is not a model saved by hpc_es; refusing to replace it "
            "(give a new or empty folder)")
    if not os.access(os.path.dirname(os.path.abspath(out)), os.W_OK | os.X_OK):
        raise FileSystemError(f"output folder '{out}': its parent folder is not writable")
