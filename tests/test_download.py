"""Tests for common/download.py against local HTTP servers on random ports."""

import hashlib
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from downpour import download
from downpour.common.data import SHIPPED_DATA_DIR
from downpour.common.errors import ConfigError, DataError
from downpour.download import MNIST_FILES, download_mnist, file_md5, training_hint

REAL = SHIPPED_DATA_DIR  # the official t10k files, shipped with downpour
T10K = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


class Server:
    """An HTTP server in a thread on 127.0.0.1:<random port>, recording GET paths.

    Serves the files of `root` under /mnist/, or uses `handler` if given.
    """

    def __init__(self, root: Path, handler: type[BaseHTTPRequestHandler] | None = None):
        requests = self.requests = []

        class Files(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler or Files)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)  # polls shutdown every 50 ms
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def served(tmp_path):
    """(directory whose files are served, server)."""
    root = tmp_path / "www"
    (root / "mnist").mkdir(parents=True)
    server = Server(root)
    yield root / "mnist", server
    server.close()


@pytest.fixture
def dest(tmp_path):
    return tmp_path / "dest"


def closed_port_url() -> str:
    """A URL on a port where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


def fake_files(served_dir: Path, monkeypatch, n: int = 2) -> dict[str, bytes]:
    """Serve n small files and make them the checksum table; returns name -> content."""
    contents = {f"file{i}.gz": bytes([i]) * (1000 + i) for i in range(n)}
    for name, data in contents.items():
        (served_dir / name).write_bytes(data)
    table = {name: hashlib.md5(data).hexdigest() for name, data in contents.items()}
    monkeypatch.setattr(download, "MNIST_FILES", table)
    return contents


def test_the_table_lists_the_four_official_files():
    assert sorted(MNIST_FILES) == sorted([
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
    assert all(len(md5) == 32 and int(md5, 16) >= 0 for md5 in MNIST_FILES.values())
    assert download.DEFAULT_MNIST_URL.startswith("https://")
    assert download.MNIST_MIRRORS[0] == download.DEFAULT_MNIST_URL
    assert len(download.MNIST_MIRRORS) >= 2


def test_real_t10k_files_download_and_pass_the_official_checksums(served, dest):
    served_dir, server = served
    for name in T10K:
        assert file_md5(REAL / name) == MNIST_FILES[name]
        shutil.copyfile(REAL / name, served_dir / name)
    seen = []
    paths = download_mnist(dest, base_url=server.url, timeout=10,
                           progress=lambda *args: seen.append(args),
                           files={name: MNIST_FILES[name] for name in T10K})
    assert paths == [dest / name for name in T10K]
    for name in T10K:
        assert (dest / name).read_bytes() == (REAL / name).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(T10K)  # no temp files left
    images = [(done, total) for name, done, total in seen if name == T10K[0]]
    size = (REAL / T10K[0]).stat().st_size
    assert images[-1] == (size, size) and len(images) > 1
    assert [done for done, _ in images] == sorted(done for done, _ in images)


def test_default_table_downloads_and_files_present_are_skipped(served, dest, monkeypatch):
    served_dir, server = served
    contents = fake_files(served_dir, monkeypatch, n=3)
    dest.mkdir()
    (dest / "file0.gz").write_bytes(contents["file0.gz"])  # already there, right md5
    (dest / "file1.gz").write_bytes(b"stale")  # there, wrong md5: replaced
    paths = download_mnist(dest, base_url=server.url, timeout=10)
    assert paths == [dest / name for name in contents]
    assert server.requests == ["/mnist/file1.gz", "/mnist/file2.gz"]
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == contents
    download_mnist(dest, base_url=server.url, timeout=10)
    assert len(server.requests) == 2  # everything present: no request at all


def test_checksum_mismatch_leaves_nothing_behind(served, dest, monkeypatch):
    served_dir, server = served
    contents = fake_files(served_dir, monkeypatch, n=1)
    actual = hashlib.md5(contents["file0.gz"]).hexdigest()
    expected = "0" * 32
    monkeypatch.setattr(download, "MNIST_FILES", {"file0.gz": expected})
    with pytest.raises(DataError) as info:
        download_mnist(dest, base_url=server.url, timeout=10)
    message = str(info.value)
    assert "file0.gz" in message and "checksum mismatch" in message
    assert f"md5 {actual}, expected {expected}" in message
    assert list(dest.iterdir()) == []  # neither the file nor a temporary


def test_http_404_names_the_url_and_the_remedies(served, dest, monkeypatch):
    _, server = served
    monkeypatch.setattr(download, "MNIST_FILES", {"absent.gz": "0" * 32})
    with pytest.raises(DataError) as info:
        download_mnist(dest, base_url=server.url, timeout=10)
    message = str(info.value)
    assert f"{server.url}absent.gz: HTTP 404" in message
    assert "--base-url" in message and "by hand" in message
    assert list(dest.iterdir()) == []


def test_unreachable_server(dest, monkeypatch):
    monkeypatch.setattr(download, "MNIST_FILES", {"a.gz": "0" * 32})
    url = closed_port_url()
    with pytest.raises(DataError, match=f"{url}a.gz: cannot reach the server"):
        download_mnist(dest, base_url=url, timeout=5)
    assert list(dest.iterdir()) == []


def test_silent_server_times_out(dest, monkeypatch):
    monkeypatch.setattr(download, "MNIST_FILES", {"a.gz": "0" * 32})
    with socket.socket() as listener:  # accepts connections (kernel backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        with pytest.raises(DataError, match="a.gz: no data within the 0.2 s timeout"):
            download_mnist(dest, base_url=url, timeout=0.2)
    assert list(dest.iterdir()) == []


def test_interrupted_transfer_leaves_nothing_behind(dest, monkeypatch):
    monkeypatch.setattr(download, "MNIST_FILES", {"a.gz": "0" * 32})

    class HalfFile(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)  # then the connection closes

        def log_message(self, *args):
            pass

    server = Server(Path("."), handler=HalfFile)
    try:
        with pytest.raises(DataError, match="a.gz: connection closed after 1000 of 100000 bytes"):
            download_mnist(dest, base_url=server.url, timeout=10)
    finally:
        server.close()
    assert list(dest.iterdir()) == []


def test_mirrors_are_tried_in_order(served, dest, monkeypatch, tmp_path):
    served_dir, good = served
    contents = fake_files(served_dir, monkeypatch, n=2)
    empty_root = tmp_path / "empty"
    (empty_root / "mnist").mkdir(parents=True)
    missing = Server(empty_root)
    try:
        download_mnist(dest, base_url=[closed_port_url(), missing.url, good.url], timeout=5)
    finally:
        missing.close()
    assert missing.requests == ["/mnist/file0.gz", "/mnist/file1.gz"]  # 404 each, then next
    assert good.requests == ["/mnist/file0.gz", "/mnist/file1.gz"]
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == contents


def test_bad_destination_and_arguments(served, tmp_path, monkeypatch):
    served_dir, server = served
    fake_files(served_dir, monkeypatch, n=1)
    nested = tmp_path / "a" / "b"
    assert download_mnist(nested, base_url=server.url) == [nested / "file0.gz"]  # created
    a_file = tmp_path / "plain"
    a_file.write_text("not a directory")
    with pytest.raises(DataError, match="cannot write"):
        download_mnist(a_file / "sub", base_url=server.url)
    with pytest.raises(ConfigError, match="no base URL"):
        download_mnist(tmp_path, base_url=[])


def test_download_command(served, tmp_path, downpour):
    """`downpour download mnist`: fetches what the mirror has, and says what it lacks."""
    served_dir, server = served
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (served_dir / name).write_bytes((REAL / name).read_bytes())
    r = downpour("download", "mnist", "--dir", tmp_path / "d", "--base-url", server.url,
                 "--timeout", "5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "could not download train-images-idx3-ubyte.gz" in r.stderr and "HTTP 404" in r.stderr
    assert "--base-url" in r.stderr
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (served_dir / name).write_bytes(b"not the real file")
    r = downpour("download", "mnist", "--dir", tmp_path / "d", "--base-url", server.url)
    assert r.returncode == 2 and "checksum mismatch" in r.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]   # verified, nothing partial


def test_training_hint_names_the_flags_for_the_full_set(tmp_path):
    assert training_hint(tmp_path / "d") == (f"train on it with: downpour train --data-dir "
                                            f"{tmp_path / 'd'} --train-split train --test-split t10k")
