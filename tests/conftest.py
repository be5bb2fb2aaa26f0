"""Shared fixtures: where the real MNIST files live, and how to run the command line."""

import subprocess
from pathlib import Path

import pytest

from downpour.launch import CLI, child_env

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"


@pytest.fixture
def shared_mnist() -> Path:
    """../shared/data/mnist: t10k (10,000 official test digits) and train-5k (5,000 training digits)."""
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the shared MNIST files are not at {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture
def downpour(tmp_path):
    """Run `downpour ARGS...` as a real process in tmp_path; returns the CompletedProcess."""
    env = child_env()

    def run(*args, timeout=120, **kwargs):
        return subprocess.run([*CLI, *map(str, args)], cwd=tmp_path,
                              env={**env, **kwargs.pop("env", {})}, capture_output=True,
                              text=True, timeout=timeout, **kwargs)
    return run
