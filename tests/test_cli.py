"""The `downpour` command as a user runs it: real processes, exit codes, messages."""

import gzip
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest


def test_train_on_synthetic_data_writes_metrics(downpour, tmp_path):
    r = downpour("train", "--synthetic", "1000", "--hidden", "16", "--epochs", "1",
                 "--batch-size", "50", "--metrics", "m.jsonl", "--save", "model.npz")
    assert r.returncode == 0, r.stderr
    assert "synthetic data: 1000 training and 200 held-out samples" in r.stderr
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines[-1]["event"] == "end" and lines[-1]["updates"] == 20
    assert (tmp_path / "model.npz").is_file()
    assert not list(tmp_path.glob(".model.npz.*"))              # no temporary left behind


def test_default_data_is_the_shipped_digits_and_says_so(downpour, tmp_path):
    """No --data-dir, no $DOWNPOUR_DATA_DIR (the runner drops DOWNPOUR_*), no data/mnist."""
    r = downpour("train", "--mode", "single", "--epochs", "1", "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "data").exists()
    assert ("MNIST digits shipped with downpour: train on 't10k' (10000), "
            "hold out 'train-5k' (5000)") in r.stderr
    end = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert end["samples"] == 10000 // 64 * 64 and end["test_accuracy"] >= 0.9


def test_default_data_dir_from_the_environment(downpour, mnist_dir, tmp_path):
    for split in ("train-5k", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte.gz"
            shutil.copy(mnist_dir / name, tmp_path / name.replace("train-5k", "train"))
    r = downpour("train", "--hidden", "8", "--epochs", "1", "--batch-size", "500",
                 "--train-split", "train", "--test-split", "t10k",
                 env={"DOWNPOUR_DATA_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert f"MNIST from {tmp_path}: train on 'train' (5000), hold out 't10k' (10000)" in r.stderr


ROOT = Path(__file__).resolve().parents[1]


def bad(downpour, *args, env=None):
    r = downpour("train", "--epochs", "1", *args, env=env or {})
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("downpour: error: ")
    return lines[-1]


def test_missing_data_directory(downpour, tmp_path):
    msg = bad(downpour, "--data-dir", tmp_path / "nowhere")
    assert "has no MNIST split 't10k'" in msg and "--data-dir" in msg


def test_truncated_data_file(downpour, mnist_dir, tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    for name in ("t10k-labels-idx1-ubyte.gz", "train-5k-images-idx3-ubyte.gz",
                 "train-5k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / name, data / name)
    raw = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
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
    assert r.returncode == 2 and "unrecognized argument --learning-rate" in r.stderr


@pytest.mark.parametrize("args, suggestion", [
    (("train", "--wokers", "2"), "did you mean --workers?"),
    (("train", "--epohcs=3"), "did you mean --epochs?"),
    (("scheduler", "--shadrs", "2"), "did you mean --shards?"),
    (("bench", "comm", "--repaets", "3"), "did you mean --repeats?"),
])
def test_a_mistyped_flag_gets_the_nearest_flag(downpour, args, suggestion):
    r = downpour(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]          # one line, no usage dump
    assert suggestion in r.stderr


def test_a_mistyped_variable_gets_the_nearest_variable(downpour):
    msg = bad(downpour, env={"DOWNPOUR_WOKERS": "2"})
    assert "unknown setting 'DOWNPOUR_WOKERS' in the environment; did you mean 'DOWNPOUR_WORKERS'?" in msg


def test_version(downpour):
    r = downpour("--version")
    assert r.returncode == 0 and re.fullmatch(r"downpour \d+\.\d+\.\d+\S*\n", r.stdout)


@pytest.mark.parametrize("how", ["flag", "variable", "file"])
def test_a_setting_the_mode_does_not_use_is_an_error(downpour, tmp_path, how):
    (tmp_path / "run.toml").write_text("workers = 4\n")
    given = {"flag": (["--workers", "4"], {}), "variable": ([], {"DOWNPOUR_WORKERS": "4"}),
             "file": (["--config", "run.toml"], {})}[how]
    msg = bad(downpour, "--mode", "single", *given[0], env=given[1])
    assert "workers is a setting of --mode async, sync, ssp, hybrid, hogwild; --mode single does not " \
           "use it" in msg
    msg = bad(downpour, "--mode", "async", "--backup", "1")
    assert "backup is a setting of --mode sync; --mode async does not use it" in msg


def test_a_table_in_the_config_file_is_explained(downpour, tmp_path):
    (tmp_path / "run.toml").write_text("[train]\nepochs = 2\n")
    msg = bad(downpour, "--config", "run.toml")
    assert "[train] is a table, but settings are top-level keys" in msg and "did you mean" not in msg


def test_the_example_config_file_runs(downpour, tmp_path):
    r = downpour("train", "--config", ROOT / "examples" / "run.toml", "--epochs", "1",
                 "--eval-every", "1", "--metrics", "m.jsonl", "--save", "out/model.npz",
                 "--progress", "none")
    assert r.returncode == 0, r.stderr
    end = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert end["mode"] == "async" and end["workers"] == 2 and end["shards"] == 2
    assert (tmp_path / "out" / "model.npz").is_file()


@pytest.mark.parametrize("mode", ["single", "async", "hogwild"])
def test_an_unwritable_output_fails_before_any_training(downpour, tmp_path, mode):
    """A path under /proc cannot be created: the run stops before its first step (no
    data line, no evaluation, no metrics file), whatever the mode."""
    for flag in ("--save", "--metrics"):
        msg = bad(downpour, "--mode", mode, "--epochs", "50", flag, "/proc/nope/out.file",
                  *(["--metrics", "m.jsonl"] if flag == "--save" else []))
        assert f"cannot write {flag} '/proc/nope/out.file'" in msg
        assert not (tmp_path / "m.jsonl").exists()


def test_output_folders_are_made_and_files_follow_the_umask(downpour, tmp_path):
    r = downpour("train", "--synthetic", "600", "--hidden", "8", "--epochs", "1",
                 "--metrics", "runs/a/m.jsonl", "--save", "runs/b/model.npz",
                 preexec_fn=lambda: os.umask(0o022))
    assert r.returncode == 0, r.stderr
    for path in ("runs/a/m.jsonl", "runs/b/model.npz"):
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == 0o644, path
    r = downpour("train", "--synthetic", "600", "--hidden", "8", "--epochs", "1",
                 "--save", "runs/c/model.npz", preexec_fn=lambda: os.umask(0o077))
    assert stat.S_IMODE((tmp_path / "runs/c/model.npz").stat().st_mode) == 0o600


def test_help_lists_settings_with_defaults(downpour):
    r = downpour("train", "--help")
    assert r.returncode == 0 and "--batch-size" in r.stdout and "(default: 64)" in r.stdout


def test_a_server_checks_its_checkpoint_folder_before_it_joins(downpour, tmp_path):
    r = downpour("server", "--scheduler", f"ipc://{tmp_path}/nowhere", "--start-timeout-s", "30",
                 "--checkpoint-dir", "/proc/nope", timeout=20)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot write --checkpoint-dir '/proc/nope'" in r.stderr   # not a 30 s wait to join
