"""Download MNIST, verified by md5 and written atomically.

Each file is streamed into a temporary file in the destination directory, its md5
checked, fsynced, and only then renamed onto its final name (downpour.common.fileio). So an
interrupted, truncated or corrupt download never leaves a half-written or wrong
file under the final name, and a file already present with the right checksum is
never fetched again. Mirrors are tried in order; the error after the last one
lists why each failed. `training_hint` says how to train on what arrived.

Only the standard library is used, so importing this module does not load NumPy.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from downpour.common.errors import ConfigError, DataError
from downpour.common.fileio import atomic_write

DEFAULT_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's
FALLBACK_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"  # TensorFlow's
MNIST_MIRRORS = (DEFAULT_MNIST_URL, FALLBACK_MNIST_URL)

# the four official files -> md5 of the gzip file as published
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

Progress = Callable[[str, int, int | None], None]  # (file name, bytes so far, total or None)

_CHUNK = 1 << 16  # bytes per read from the network


class _MirrorFailed(Exception):
    """One mirror could not deliver one file; the next mirror is tried."""


def file_md5(path: str | os.PathLike) -> str:
    """The md5 hex digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_mnist(dest_dir: str | os.PathLike,
                   base_url: str | Sequence[str] = MNIST_MIRRORS,
                   timeout: float = 30.0,
                   progress: Progress | None = None,
                   files: Mapping[str, str] | None = None) -> list[Path]:
    """Make sure `dest_dir` holds every file of `files` with its md5; return their paths.

    base_url: one URL or a list of mirrors tried in order (the file name is
        appended to each); the default is `MNIST_MIRRORS`.
    timeout: seconds allowed for connecting and for each read.
    progress: called as progress(name, bytes_so_far, total_or_None) per chunk.
    files: file name -> md5; defaults to `MNIST_FILES`.

    Files already present with the right md5 are skipped; present with a wrong md5,
    they are replaced. Every file is tried; then DataError lists each that could not
    be fetched from any mirror (HTTP error, unreachable server, timeout, checksum
    mismatch). The files that did arrive stay, and nothing partial is left behind.
    """
    dest = Path(dest_dir)
    mirrors = [base_url] if isinstance(base_url, str) else list(base_url)
    if not mirrors:
        raise ConfigError("download_mnist: no base URL given; pass at least one mirror")
    files = MNIST_FILES if files is None else files

    paths, errors = [], []
    for name, md5 in files.items():
        final = dest / name
        paths.append(final)
        if final.is_file() and file_md5(final) == md5:
            continue
        failures = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            try:
                _fetch(url, final, md5, timeout, progress)
                break
            except _MirrorFailed as e:
                failures.append(f"  {url}: {e}")
            except OSError as e:  # local: the directory or disk, not the network
                raise DataError(f"{final}: cannot write ({e.strerror or e}); choose a "
                                f"writable directory with --dir") from None
        else:
            errors.append(f"{final}: could not download {name} (md5 {md5}) from any mirror:\n"
                          + "\n".join(failures))
    if errors:
        raise DataError("\n".join(errors) + "\npass another mirror with --base-url URL, or copy "
                        f"the files into {dest} by hand")
    return paths


def training_hint(dest_dir: str | os.PathLike) -> str:
    """One line telling the user how to train on the full MNIST downloaded to `dest_dir`
    (by default downpour trains on the 15,000 digits it ships, not on a download)."""
    return (f"train on it with: downpour train --data-dir {dest_dir} "
            "--train-split train --test-split t10k")


def _fetch(url: str, final: Path, md5: str, timeout: float, progress: Progress | None) -> None:
    """Download `url` to `final` atomically (downpour.common.fileio.atomic_write).

    Raises _MirrorFailed for anything that went wrong during the transfer
    (including a checksum mismatch, and a disk filling up) and OSError if the
    temporary file cannot be made or renamed; either way `final` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(final, lambda out: _stream(url, out, md5, timeout, progress, final.name))


def _stream(url: str, out, md5: str, timeout: float, progress: Progress | None, name: str) -> None:
    """Copy the body of `url` into `out`, checking its length and md5."""
    digest, done, total = hashlib.md5(), 0, None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(name, done, total)
    except urllib.error.HTTPError as e:
        raise _MirrorFailed(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _MirrorFailed(f"cannot reach the server ({e.reason})") from None
    except TimeoutError:
        raise _MirrorFailed(f"no data within the {timeout} s timeout") from None
    except (OSError, http.client.HTTPException) as e:  # reset, TLS, disk full
        raise _MirrorFailed(f"failed after {done} bytes ({e!r})") from None
    if total is not None and done != total:
        raise _MirrorFailed(f"connection closed after {done} of {total} bytes")
    actual = digest.hexdigest()
    if actual != md5:
        raise _MirrorFailed(f"checksum mismatch: md5 {actual}, expected {md5}")
