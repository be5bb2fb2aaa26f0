"""Output paths: made ready before any work, written atomically with the user's umask."""

import os
import stat

import pytest

from downpour.common.errors import ConfigError
from downpour.common.fileio import atomic_write, prepare_output


def test_prepare_output_makes_the_missing_folders_and_writes_nothing(tmp_path):
    path = prepare_output(tmp_path / "a" / "b" / "model.npz", "--save")
    assert (tmp_path / "a" / "b").is_dir() and not path.exists()
    assert list((tmp_path / "a" / "b").iterdir()) == []          # the probe is gone
    assert prepare_output(tmp_path / "ckpt", "--checkpoint-dir", directory=True).is_dir()


@pytest.mark.parametrize("path, expected", [
    ("/proc/nope/model.npz", "cannot write --save '/proc/nope/model.npz': No such file"),
    ("/proc/version/model.npz", "cannot write --save '/proc/version/model.npz'"),
])
def test_prepare_output_fails_at_once_naming_the_setting(path, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        prepare_output(path, "--save")


def test_prepare_output_refuses_a_folder_for_a_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give a file name"):
        prepare_output(tmp_path, "--metrics")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == mode
    assert (tmp_path / "f.bin").read_bytes() == b"x"


def test_atomic_write_leaves_nothing_when_writing_fails(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "f.bin", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    assert (tmp_path / "f.bin").read_bytes() == b"old"
