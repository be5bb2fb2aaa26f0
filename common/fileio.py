"""Files that must never be half-written: saved models, checkpoints, downloads.

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


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(f)` writes, atomically and durably.

    Whatever `write` raises propagates, with nothing left behind.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise ConfigError(f"cannot write {str(path)!r}: directory {str(directory)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
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
