"""The `downpour` command as a user runs it: real processes, exit codes, messages."""

import gzip
import json
import shutil


def test_train_on_synthetic_data_writes_metrics(downpour, tmp_path):
    r = downpour("train", "--synthetic", "1000", "--hidden", "16", "--epochs", "1",
                 "--batch-size", "50", "--metrics", "m.jsonl", "--save", "model.npz")
    assert r.returncode == 0, r.stderr
    assert "synthetic data: 1000 training and 200 held-out samples" in r.stderr
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "end" and lines[-1]["updates"] == 20
    assert (tmp_path / "model.npz").is_file()
    assert not list(tmp_path.glob(".model.npz.*"))              # no temporary left behind


def test_default_data_falls_back_to_synthetic_and_says_so(downpour):
    r = downpour("train", "--hidden", "8", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    assert "no MNIST in data/mnist" in r.stderr and "using synthetic data" in r.stderr


def test_default_data_dir_from_the_environment(downpour, shared_mnist, tmp_path):
    for split in ("train-5k", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte.gz"
            shutil.copy(shared_mnist / name, tmp_path / name.replace("train-5k", "train"))
    r = downpour("train", "--hidden", "8", "--epochs", "1", "--batch-size", "500",
                 env={"DOWNPOUR_DATA_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert f"MNIST from {tmp_path}: train on 'train' (5000), hold out 't10k' (10000)" in r.stderr


def bad(downpour, *args):
    r = downpour("train", "--epochs", "1", *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("downpour: error: ")
    return lines[-1]


def test_missing_data_directory(downpour, tmp_path):
    msg = bad(downpour, "--data-dir", tmp_path / "nowhere")
    assert "has no MNIST split 'train'" in msg and "--data-dir" in msg


def test_truncated_data_file(downpour, shared_mnist, tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    for name in ("t10k-labels-idx1-ubyte.gz", "train-5k-images-idx3-ubyte.gz",
                 "train-5k-labels-idx1-ubyte.gz"):
        shutil.copy(shared_mnist / name, data / name)
    raw = gzip.decompress((shared_mnist / "t10k-images-idx3-ubyte.gz").read_bytes())
    (data / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:100_000]))
    msg = bad(downpour, "--data-dir", data, "--train-split", "t10k", "--test-split", "train-5k")
    assert "t10k-images-idx3-ubyte.gz: truncated payload" in msg


def test_unknown_optimizer(downpour):
    msg = bad(downpour, "--optimizer", "adamw")
    assert "unknown optimizer 'adamw'" in msg and "adam" in msg


def test_negative_learning_rate(downpour):
    assert "lr must be >= 0.0, got -0.1" in bad(downpour, "--lr=-0.1")


def test_malformed_hidden(downpour):
    assert "expected comma-separated positive integers" in bad(downpour, "--hidden", "256,x")


def test_unknown_flag_is_a_usage_error(downpour):
    r = downpour("train", "--learning-rate", "0.1")
    assert r.returncode == 2 and "unrecognized arguments: --learning-rate" in r.stderr


def test_help_lists_settings_with_defaults(downpour):
    r = downpour("train", "--help")
    assert r.returncode == 0 and "--batch-size" in r.stdout and "(default: 64)" in r.stdout
