"""Shared fixtures: where the real MNIST files live, and how to run the command line."""

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from downpour.common.data import SHIPPED_DATA_DIR, has_mnist
from downpour.launch import CLI, child_env

ROOT = Path(__file__).resolve().parents[1]
MNIST_SPLITS = ("t10k", "train-5k")  # the splits the tests train and evaluate on
SOCKET_PATH_MAX = 80                # a unix socket's path is short (108 bytes with its name)
FUZZ_EXAMPLES = 500                  # tests/test_fuzz.py: examples per fuzz target in a default run


def pytest_addoption(parser):
    parser.addoption("--fuzz-examples", type=int, default=FUZZ_EXAMPLES, metavar="N",
                     help=f"examples (messages) per fuzz target in tests/test_fuzz.py "
                          f"(default {FUZZ_EXAMPLES}; e.g. 20000 for a long run)")
    parser.addoption("--docker", action="store_true",
                     help="also run the tests marked docker (tests/test_containers.py): they build "
                          "images, run compose clusters and may `docker swarm init` on the engine "
                          "that answers (../shared/tools/docker-engine.sh starts one); off by default")


def pytest_collection_modifyitems(config, items):
    """Container tests are opt-in: without --docker, every test marked docker is skipped, so a
    plain `python -m pytest` never touches the machine's Docker engine."""
    if config.getoption("--docker"):
        return
    skip = pytest.mark.skip(reason="drives a real Docker engine (builds images, runs compose "
                                   "clusters, may `docker swarm init`): opt in with --docker")
    for item in items:
        if item.get_closest_marker("docker"):
            item.add_marker(skip)


@pytest.fixture
def mnist_dir() -> Path:
    """A directory holding MNIST t10k (10,000 official test digits) and train-5k (5,000
    training digits): $DOWNPOUR_DATA_DIR if set, else the digits shipped with downpour."""
    chosen = os.environ.get("DOWNPOUR_DATA_DIR")
    if not chosen:
        return SHIPPED_DATA_DIR
    if not all(has_mnist(chosen, split) for split in MNIST_SPLITS):
        pytest.skip(f"DOWNPOUR_DATA_DIR={chosen} lacks the t10k or train-5k split; point it at a "
                    "directory holding both, or unset it to test on the digits shipped with downpour")
    return Path(chosen)


@pytest.fixture
def socket_dir(tmp_path):
    """A folder for ipc:// socket files: tmp_path, or a short temporary one (removed after
    the test) when tmp_path's path is too long for a unix socket."""
    if len(str(tmp_path)) < SOCKET_PATH_MAX:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="dp-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def downpour(tmp_path):
    """Run `downpour ARGS...` as a real process in tmp_path; returns the CompletedProcess.

    The child gets no DOWNPOUR_* variables (`child_env`) unless passed in `env=`."""
    env = child_env()

    def run(*args, timeout=120, **kwargs):
        return subprocess.run([*CLI, *map(str, args)], cwd=tmp_path,
                              env={**env, **kwargs.pop("env", {})}, capture_output=True,
                              text=True, timeout=timeout, **kwargs)
    return run


@pytest.fixture
def nodes(tmp_path):
    """start(*args) -> Popen of `downpour ARGS` in tmp_path, in a session of its own (stderr
    piped, as text); every one still running at teardown is killed with its children."""
    started = []

    def start(*args):
        p = subprocess.Popen([*CLI, *map(str, args)], cwd=tmp_path, env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        started.append(p)
        return p
    yield start
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=10)
