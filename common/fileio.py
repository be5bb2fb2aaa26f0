"""Output files: checked before any work, and never half-written.

One rule for every output path (`--save`, `--metrics`, `--out`, checkpoints, plots):
`prepare_output` runs before any work starts. It creates missing parent folders and
proves the folder writable by creating and removing a probe file in it, so a bad
path fails at once with a ConfigError that names the setting, never after a run.

`atomic_write` writes to a temporary file in the target's directory, fsyncs it,
renames it over the target and fsyncs the directory, so a reader (or a restart
after a crash) sees either the old file or the new one, never a mix. If writing
fails, the temporary file is removed and the target is untouched.

Standard library only, so importing it does not load NumPy.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from downpour.common.errors import ConfigError


def prepare_output(path: str | os.PathLike, what: str, directory: bool = False) -> Path:
    """`path` made ready for writing: its parent folders (or, with `directory`, the folder
    itself) created, and the folder shown writable. ConfigError naming `what` otherwise.
    Writes nothing at `path` itself."""
    path = Path(path)
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory; give a file name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".downpour-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"cannot write {what} {str(path)!r}: {reason} ({str(folder)!r}); "
                          f"choose a path in a folder you can write") from None
    return path


def _umask() -> int:
    """This process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(f)` writes, atomically and durably, with
    the permissions the user's umask gives a new file.

    Whatever `write` raises propagates, with nothing left behind.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise ConfigError(f"cannot write {str(path)!r}: directory {str(directory)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())     # as open() would create it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` survive a crash (POSIX; best effort elsewhere)."""
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
