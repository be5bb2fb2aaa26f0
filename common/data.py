"""Datasets: reading them, making them, and copying a batch's rows out of them.

Two parts, each a few functions:

- reading: `read_idx` parses one IDX file (raw or gzip), `load_mnist_split` reads
  and checks one MNIST split, `find_mnist` decides which directory to read,
  `load_mnist` turns two splits into standardised float32 `Dataset`s;
  `synthetic_dataset` makes a seeded problem of any size;
- the hot path: `gather` copies a batch's rows into a preallocated buffer.

Which samples make each batch, and which worker takes them, is the order of a run:
downpour.common.order. Every bad file raises `DataError` naming the file, the
problem and what to do.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from downpour.common.errors import ConfigError, DataError

DEFAULT_DATA_DIR = "data/mnist"  # relative to the cwd; used when $DOWNPOUR_DATA_DIR is not set
# 15,000 real digits installed with the package (README.md there: source, licence, md5s)
SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "mnist"
SHIPPED_SPLITS = {"t10k": "10,000 official test digits", "train-5k": "5,000 training digits"}
MNIST_SHAPE = (28, 28)
MNIST_CLASSES = 10

_DOWNLOAD_HINT = "replace it with a good copy (`downpour download mnist --dir DIR`)"
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20  # bytes per read or per temporary block; bounds the extra memory

# IDX type code (third magic byte) -> big-endian item type of the payload
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def default_data_dir() -> Path:
    """The user's own MNIST directory: $DOWNPOUR_DATA_DIR if set, else `DEFAULT_DATA_DIR`;
    read at call time. Downloads go here; `find_mnist` looks here before the shipped digits."""
    return Path(os.environ.get("DOWNPOUR_DATA_DIR", DEFAULT_DATA_DIR))


# ---------------------------------------------------------------------------- reading


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file, gzip-compressed or raw, into a native-endian array.

    IDX layout: 2 zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), the number of dims d (1..4), d
    big-endian uint32 sizes, then exactly prod(sizes) big-endian items.
    Compression is detected from the gzip magic bytes, not the file name.

    Raises DataError if the file is missing or unreadable, the gzip stream is
    corrupt, the header is invalid, or the payload is shorter or longer than the
    header says.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            is_gzip = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
            with f:
                return _parse_idx(f, path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; point --data-dir at a directory holding "
                        f"{path.name}, or run `downpour download mnist --dir DIR`") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(
            f"{path}: corrupt gzip stream ({e}); expected a complete gzip file; "
            f"the file is damaged or truncated: {_DOWNLOAD_HINT}"
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); "
                        "check that it is a readable file") from None


def _parse_idx(f, path: Path) -> np.ndarray:
    """The body of `read_idx` on an open (decompressed) byte stream."""
    magic = f.read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: {len(magic)} bytes, too short for an IDX header "
                        f"(expected at least 4); {_DOWNLOAD_HINT}")
    if magic[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file: starts with bytes {magic[:2].hex(' ')}, "
                        f"expected the IDX magic 00 00; check that this is an IDX file "
                        f"(e.g. MNIST), not some other format")
    if magic[2] not in _IDX_DTYPES:
        codes = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{magic[2]:02X} (byte 3), expected "
                        f"one of {codes}; the file is damaged or not an IDX file")
    if not 1 <= magic[3] <= 4:
        raise DataError(f"{path}: IDX header says {magic[3]} dims (byte 4), expected "
                        f"1..4; the file is damaged or not an IDX file")
    dtype, ndim = _IDX_DTYPES[magic[2]], magic[3]
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: IDX header truncated: expected {4 * ndim} bytes of "
                        f"dimension sizes, got {len(dims)}; {_DOWNLOAD_HINT}")
    shape = tuple(int.from_bytes(dims[4 * i:4 * i + 4], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize

    buf = bytearray()
    while len(buf) <= expected:  # read one byte past the end to detect trailing data
        chunk = f.read(min(_CHUNK, expected + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
    if len(buf) < expected:
        raise DataError(f"{path}: truncated payload: shape {shape} of {dtype.name} "
                        f"needs {expected} bytes, got {len(buf)}; {_DOWNLOAD_HINT}")
    if len(buf) > expected:
        extra = 1 + len(f.read())
        raise DataError(f"{path}: {extra} trailing bytes after the payload: shape "
                        f"{shape} of {dtype.name} needs exactly {expected} bytes; "
                        f"the file is damaged: {_DOWNLOAD_HINT}")
    array = np.frombuffer(buf, dtype=dtype).reshape(shape)  # (*shape,) big-endian
    return array.astype(dtype.newbyteorder("="), copy=False)  # no copy for 1-byte types


def _split_file(data_dir: Path, split: str, kind: str, idx_dims: int) -> Path | None:
    """The path of one MNIST file, preferring `.gz`; None if neither exists."""
    name = f"{split}-{kind}-idx{idx_dims}-ubyte"
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    return None


def has_mnist(data_dir: str | os.PathLike, split: str) -> bool:
    """Whether `data_dir` holds both files of `split` (content is not checked)."""
    data_dir = Path(data_dir)
    return (_split_file(data_dir, split, "images", 3) is not None
            and _split_file(data_dir, split, "labels", 1) is not None)


def find_mnist(data_dir: str | os.PathLike | None, splits: Sequence[str]) -> Path:
    """The directory to read the MNIST `splits` from, in this order:

    1. `data_dir` if given, else $DOWNPOUR_DATA_DIR if set: it must hold every split;
    2. `DEFAULT_DATA_DIR` (relative to the cwd), if it holds every split;
    3. `SHIPPED_DATA_DIR`, the digits installed with downpour (`SHIPPED_SPLITS` only).

    Only the presence of the files is checked. Raises DataError naming the first
    missing split and what to do: for an explicit directory, where to point it; else
    which splits are shipped and how to get the full set.
    """
    explicit = data_dir or os.environ.get("DOWNPOUR_DATA_DIR")
    candidates = [Path(explicit)] if explicit else [Path(DEFAULT_DATA_DIR), SHIPPED_DATA_DIR]
    for candidate in candidates:
        if all(has_mnist(candidate, split) for split in splits):
            return candidate
    missing = next(s for s in splits if not has_mnist(candidates[-1], s))
    if explicit:
        raise DataError(f"{str(explicit)!r} has no MNIST split {missing!r} (expected "
                        f"{missing}-images-idx3-ubyte.gz and {missing}-labels-idx1-ubyte.gz); "
                        "point --data-dir at a directory holding them, set --train-split/"
                        "--test-split, or run `downpour download mnist --dir DIR`; without "
                        "--data-dir and $DOWNPOUR_DATA_DIR the digits shipped with downpour are used")
    shipped = ", ".join(f"{name!r} ({about})" for name, about in SHIPPED_SPLITS.items())
    raise DataError(f"no MNIST split {missing!r}: no --data-dir given, {DEFAULT_DATA_DIR} does not "
                    f"hold it, and downpour ships only {shipped}; use those as --train-split/"
                    f"--test-split, or get the full set with `downpour download mnist --dir "
                    f"{DEFAULT_DATA_DIR}` and train with `--data-dir {DEFAULT_DATA_DIR} "
                    f"--train-split train --test-split t10k`")


def load_mnist_split(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read `{split}-images-idx3-ubyte[.gz]` and `{split}-labels-idx1-ubyte[.gz]`.

    Returns images uint8 (N, 28, 28) and labels uint8 (N,) in 0..9, exactly as
    stored. The `.gz` file is preferred when both forms exist. Raises DataError if
    a file is missing or malformed (see `read_idx`), is not of the MNIST kind
    (images: magic 2051, 3-d uint8 28x28; labels: magic 2049, 1-d uint8), a label
    is out of range, or the two counts differ.
    """
    data_dir = Path(data_dir)
    arrays = []
    for kind, idx_dims, want in (("images", 3, f"uint8 (N, {MNIST_SHAPE[0]}, {MNIST_SHAPE[1]})"),
                                 ("labels", 1, "uint8 (N,)")):
        path = _split_file(data_dir, split, kind, idx_dims)
        if path is None:
            name = f"{split}-{kind}-idx{idx_dims}-ubyte.gz"
            problem = ("no such file (nor an uncompressed one without .gz)" if data_dir.is_dir()
                       else f"no such file: the directory {data_dir} does not exist")
            raise DataError(f"{data_dir / name}: {problem}; point --data-dir at a directory "
                            f"holding {name}, or run `downpour download mnist --dir DIR`")
        a = read_idx(path)
        shape_ok = a.ndim == idx_dims and (kind == "labels" or a.shape[1:] == MNIST_SHAPE)
        if a.dtype != np.uint8 or not shape_ok:
            raise DataError(f"{path}: holds {a.dtype.name} {a.shape}, expected MNIST "
                            f"{kind} {want}; check that the file is the {kind} file "
                            f"of split {split!r}")
        arrays.append((path, a))
    (images_path, images), (labels_path, labels) = arrays

    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} "
                        f"holds {len(labels)} labels; expected equal counts: the two "
                        f"files come from different splits or one is damaged")
    bad = np.flatnonzero(labels >= MNIST_CLASSES)
    if bad.size:
        raise DataError(f"{labels_path}: {bad.size} labels out of range 0..9 (first: "
                        f"label {labels[bad[0]]} at index {bad[0]}); {_DOWNLOAD_HINT}")
    return images, labels


# ---------------------------------------------------------------------------- datasets


@dataclass
class Dataset:
    """A classification dataset held in memory.

    x: float32 (N, D), C-contiguous, standardised; y: int64 (N,) in [0, n_classes).
    Construction checks these and raises DataError if they do not hold.
    """

    x: np.ndarray
    y: np.ndarray
    n_classes: int
    name: str

    def __post_init__(self) -> None:
        x, y = self.x, self.y
        if x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous:
            raise DataError(f"dataset {self.name!r}: x must be C-contiguous float32 "
                            f"(N, D), got {x.dtype.name} {x.shape}")
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise DataError(f"dataset {self.name!r}: y must be int64 ({len(x)},), "
                            f"got {y.dtype.name} {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= self.n_classes):
            raise DataError(f"dataset {self.name!r}: labels span {y.min()}..{y.max()}, "
                            f"expected 0..{self.n_classes - 1}")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def n_features(self) -> int:
        return self.x.shape[1]


def standardize(x: np.ndarray, mean: float, std: float,
                out: np.ndarray | None = None) -> np.ndarray:
    """(x - mean) / std as float32, into `out` if given (`out=x` works in place)."""
    out = np.subtract(x, np.float32(mean), out=out, dtype=np.float32)
    return np.divide(out, np.float32(std), out=out)


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    """Scalar mean and std of a non-empty float32 (N, D) array, accumulated in
    float64 block by block so no float64 copy of the whole array is made."""
    mean = float(x.mean(dtype=np.float64))  # numpy casts in small buffers, no copy
    rows = max(1, _CHUNK // (8 * x.shape[1]))
    sq = 0.0
    for lo in range(0, len(x), rows):
        d = x[lo:lo + rows].astype(np.float64)  # (rows, D), about _CHUNK bytes
        d -= mean
        sq += float(np.vdot(d, d))
    return mean, math.sqrt(sq / x.size) or 1.0


def load_mnist(data_dir: str | os.PathLike | None = None, train_split: str = "train",
               test_split: str = "t10k") -> tuple[Dataset, Dataset]:
    """MNIST as (train, test) Datasets: x float32 (N, 784), y int64, 10 classes.

    Pixels are scaled to [0, 1] and then standardised with the global scalar mean
    and std of the TRAIN split (one number each, over all pixels); the same two
    numbers are applied to the test split, so test statistics never leak into
    training. `data_dir` defaults to `find_mnist`'s choice. Raises DataError as
    `find_mnist` and `load_mnist_split` do.
    """
    data_dir = find_mnist(None, (train_split, test_split)) if data_dir is None else Path(data_dir)
    train_images, train_labels = load_mnist_split(data_dir, train_split)
    test_images, test_labels = load_mnist_split(data_dir, test_split)

    # exact statistics from the pixel histogram, in units of the [0, 1] scale
    counts = np.bincount(train_images.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = counts @ values / counts.sum()
    std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum())) or 1.0

    def make(images: np.ndarray, labels: np.ndarray, split: str) -> Dataset:
        x = images.reshape(len(images), -1).astype(np.float32)  # (N, 784)
        x *= np.float32(1 / 255)
        standardize(x, mean, std, out=x)
        return Dataset(x, labels.astype(np.int64), MNIST_CLASSES, f"mnist-{split}")

    return make(train_images, train_labels, train_split), make(test_images, test_labels, test_split)


def synthetic_dataset(n_train: int, n_test: int, n_features: int = 784, n_classes: int = 10,
                      seed: int = 0, class_sep: float = 4.0) -> tuple[Dataset, Dataset]:
    """A seeded Gaussian-cluster classification problem of any size.

    Each class k has a centre c_k ~ N(0, class_sep^2 / (2 D) I), so two centres lie
    about `class_sep` noise standard deviations apart; a sample of class k is
    c_k + N(0, I). Classes are balanced to within one sample. With the default
    class_sep = 4 and 10 classes the Bayes accuracy is about 87%: hard enough that
    more data and more steps keep helping, easy enough that a small MLP gets far
    above chance. Both splits are then standardised with the train split's scalar
    mean and std, as MNIST is.

    Deterministic for a seed; the train split does not depend on n_test. Generated
    in float32 directly (no float64 copy of the data).
    """
    for name, value, low in (("n_train", n_train, 1), ("n_test", n_test, 0),
                             ("n_features", n_features, 1), ("n_classes", n_classes, 2),
                             ("seed", seed, 0)):
        if int(value) != value or value < low:
            raise ConfigError(f"synthetic_dataset: {name}={value!r}, expected an integer >= {low}")
    if not class_sep >= 0:
        raise ConfigError(f"synthetic_dataset: class_sep={class_sep!r}, expected >= 0")

    # separate streams: centres, train and test never shift when another size changes
    rng = np.random.default_rng([seed, 0x5EED, 0])
    scale = np.float32(class_sep / np.sqrt(2 * n_features))
    centres = rng.standard_normal((n_classes, n_features), dtype=np.float32) * scale  # (C, D)

    def make(n: int, stream: int, split: str) -> Dataset:
        rng = np.random.default_rng([seed, 0x5EED, stream])
        y = rng.permutation(np.arange(n, dtype=np.int64) % n_classes)  # (N,)
        x = rng.standard_normal((n, n_features), dtype=np.float32)  # (N, D) noise
        rows = max(1, _CHUNK // (4 * n_features))
        for lo in range(0, n, rows):  # blocks of rows: centres[y] never materialises whole
            x[lo:lo + rows] += centres[y[lo:lo + rows]]
        return Dataset(x, y, n_classes, f"synthetic-{split}")

    train, test = make(n_train, 1, "train"), make(n_test, 2, "test")
    mean, std = _mean_std(train.x)
    for ds in (train, test):
        standardize(ds.x, mean, std, out=ds.x)
    return train, test


# ---------------------------------------------------------------------------- hot path


def gather(x: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of x at idx: (len(idx), *x.shape[1:]), written into `out` if given.

    With a preallocated `out` of that shape and dtype nothing is allocated: the
    bounds are checked here so np.take can run unbuffered (mode="clip").
    Raises IndexError for an index outside [0, len(x)).
    """
    if len(idx) and (idx.min() < 0 or idx.max() >= len(x)):
        raise IndexError(f"gather: indices span {idx.min()}..{idx.max()}, "
                         f"expected 0..{len(x) - 1}")
    return np.take(x, idx, axis=0, out=out, mode="clip")
