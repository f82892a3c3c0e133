"""Downloads against a real HTTP server on 127.0.0.1: resume, verification, mirrors, datasets."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from dlkit.data import load_dataset, sources, vision
from dlkit.data.download import download, download_any, parse_checksum
from dlkit.data.idx import write_idx
from dlkit.data.sources import RemoteFile
from dlkit.errors import DataError

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Server:
    """A file server on 127.0.0.1 that records requests and can honour ``Range: bytes=N-``."""

    def __init__(self, files: dict[str, bytes], *, ranges: bool = True):
        self.files = dict(files)
        self.ranges = ranges
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.truncate_at: int | None = None  # send only this many bytes, then hang up
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                time.sleep(server.delay)
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng and server.ranges:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.truncate_at is not None:
                    body = body[: server.truncate_at]
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DLKIT_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv("DLKIT_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", [tmp_path / "system"])


def test_download_with_progress(tmp_path):
    calls = []
    with Server({"/f.bin": PAYLOAD}) as srv:
        dest = download(f"{srv.url}/f.bin", tmp_path / "d" / "f.bin", checksum=sha256(PAYLOAD),
                        progress=lambda done, total: calls.append((done, total)))
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "d" / "f.bin.part").exists()
    assert calls[0] == (0, len(PAYLOAD)) and calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) >= 3


def test_checksum_mismatch_leaves_nothing(tmp_path):
    dest = tmp_path / "f.bin"
    wrong = md5(b"something else")
    with Server({"/f.bin": PAYLOAD}) as srv, pytest.raises(DataError) as info:
        download(f"{srv.url}/f.bin", dest, checksum=wrong)
    msg = info.value.message
    assert f"expected {wrong}" in msg and f"got {md5(PAYLOAD)}" in msg
    assert not dest.exists() and not Path(f"{dest}.part").exists()
    assert list(tmp_path.iterdir()) == []


def test_resume_with_range(tmp_path):
    dest = tmp_path / "f.bin"
    half = len(PAYLOAD) // 2
    Path(f"{dest}.part").write_bytes(PAYLOAD[:half])
    calls = []
    with Server({"/f.bin": PAYLOAD}) as srv:
        download(f"{srv.url}/f.bin", dest, checksum=md5(PAYLOAD),
                 progress=lambda d, t: calls.append((d, t)))
    assert srv.requests == [("/f.bin", f"bytes={half}-")]
    assert dest.read_bytes() == PAYLOAD
    assert calls[0] == (half, len(PAYLOAD)) and calls[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_server_ignoring_range_restarts(tmp_path):
    dest = tmp_path / "f.bin"
    Path(f"{dest}.part").write_bytes(b"x" * 1000)  # not even the right prefix
    with Server({"/f.bin": PAYLOAD}, ranges=False) as srv:
        download(f"{srv.url}/f.bin", dest, checksum=md5(PAYLOAD))
    assert srv.requests == [("/f.bin", "bytes=1000-")]
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_answered_416_restarts(tmp_path):
    dest = tmp_path / "f.bin"
    Path(f"{dest}.part").write_bytes(PAYLOAD + b"junk")
    with Server({"/f.bin": PAYLOAD}) as srv:
        download(f"{srv.url}/f.bin", dest, checksum=md5(PAYLOAD))
    assert [r for _, r in srv.requests] == [f"bytes={len(PAYLOAD) + 4}-", None]
    assert dest.read_bytes() == PAYLOAD


def test_broken_transfer_keeps_part_then_resumes(tmp_path):
    dest = tmp_path / "f.bin"
    with Server({"/f.bin": PAYLOAD}) as srv:
        srv.truncate_at = 30000
        with pytest.raises(DataError, match="run again to resume"):
            download(f"{srv.url}/f.bin", dest, checksum=md5(PAYLOAD))
        assert not dest.exists()
        assert Path(f"{dest}.part").stat().st_size == 30000
        srv.truncate_at = None
        download(f"{srv.url}/f.bin", dest, checksum=md5(PAYLOAD))
    assert srv.requests[-1] == ("/f.bin", "bytes=30000-")
    assert dest.read_bytes() == PAYLOAD


def test_timeout(tmp_path):
    with Server({"/f.bin": PAYLOAD}) as srv:
        srv.delay = 1.0
        with pytest.raises(DataError, match="timed out"):
            download(f"{srv.url}/f.bin", tmp_path / "f.bin", checksum=md5(PAYLOAD), timeout=0.2)
    assert not (tmp_path / "f.bin").exists()


def test_mirrors_in_order(tmp_path):
    dead = closed_port_url()
    failures: list[str] = []
    with Server({"/m/f.bin": PAYLOAD}) as srv:
        dest = download_any([f"{dead}/f.bin", f"{srv.url}/missing.bin", f"{srv.url}/m/f.bin"],
                            tmp_path / "f.bin", checksum=md5(PAYLOAD), failures=failures)
    assert dest.read_bytes() == PAYLOAD
    assert failures[0].startswith(f"{dead}/f.bin: unreachable")
    assert failures[1] == f"{srv.url}/missing.bin: HTTP 404 Not Found"


def test_all_mirrors_fail(tmp_path):
    dead = closed_port_url()
    with Server({"/f.bin": b"wrong bytes"}) as srv, pytest.raises(DataError) as info:
        download_any([f"{dead}/f.bin", f"{srv.url}/f.bin"], tmp_path / "f.bin",
                     checksum=md5(PAYLOAD))
    msg = info.value.message
    assert f"{dead}/f.bin: unreachable" in msg and f"{srv.url}/f.bin: checksum mismatch" in msg
    assert not (tmp_path / "f.bin").exists()


def test_bad_checksum_spec_is_a_bug():
    for bad in ("abc", "crc32:00", "md5:xyz", "sha256:" + "0" * 10):
        with pytest.raises(ValueError):
            parse_checksum(bad)


# --- datasets over the network -----------------------------------------------------------------


def mnist_files(folder: Path) -> dict[str, bytes]:
    """Gzipped MNIST-format files (30 train and 10 test images), written with write_idx."""
    rng = np.random.default_rng(0)
    arrays = {
        vision.IDX_NAMES[0]: rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        vision.IDX_NAMES[1]: (np.arange(30) % 10).astype(np.uint8),
        vision.IDX_NAMES[2]: rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        vision.IDX_NAMES[3]: (np.arange(10) % 10).astype(np.uint8),
    }
    folder.mkdir()
    return {f"{n}.gz": write_idx(folder / f"{n}.gz", a).read_bytes() for n, a in arrays.items()}


def patch_mnist(monkeypatch, files: dict[str, bytes], mirrors: tuple[str, ...]) -> None:
    fileset = replace(
        vision.MNIST,
        files=tuple(RemoteFile(rf.name, md5(files[rf.remote_name])) for rf in vision.MNIST.files),
        mirrors=mirrors,
    )
    monkeypatch.setattr(vision, "MNIST", fileset)


def test_load_mnist_downloads_into_cache(tmp_path, monkeypatch):
    files = mnist_files(tmp_path / "served")
    got = []
    with Server({f"/mnist/{k}": v for k, v in files.items()}) as srv:
        patch_mnist(monkeypatch, files, (closed_port_url() + "/", f"{srv.url}/mnist/"))
        b = load_dataset("mnist", val_fraction=0.2, progress=lambda d, t, n: got.append((d, t, n)))
    cache = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(files)
    assert b.source == f"{cache} (downloaded)"
    assert b.train[0].shape == (24, 1, 28, 28) and b.val[0].shape == (6, 1, 28, 28)
    assert b.test[0].shape == (10, 1, 28, 28)
    assert {n for _, _, n in got} == set(files)
    assert (len(files["t10k-labels-idx1-ubyte.gz"]),) * 2 + ("t10k-labels-idx1-ubyte.gz",) in got

    # Next time it comes from the cache, offline, with identical tensors.
    monkeypatch.setenv("DLKIT_OFFLINE", "1")
    again = load_dataset("mnist", val_fraction=0.2)
    assert again.source == f"{cache} (cache)"
    assert torch.equal(again.train[0], b.train[0]) and torch.equal(again.test[1], b.test[1])


def test_load_mnist_all_mirrors_fail(tmp_path, monkeypatch):
    files = mnist_files(tmp_path / "served")
    dead = closed_port_url()
    with Server({}) as srv:  # answers 404 to everything
        patch_mnist(monkeypatch, files, (dead + "/", f"{srv.url}/mnist/"))
        with pytest.raises(DataError) as info:
            load_dataset("mnist", data_dir=tmp_path / "nowhere")
    err = info.value
    assert err.message.startswith("dataset 'mnist' could not be downloaded; tried: ")
    assert f"{tmp_path / 'nowhere'} (data-dir: no such folder)" in err.message
    assert f"{dead}/train-images-idx3-ubyte.gz: unreachable" in err.message
    assert f"{srv.url}/mnist/train-images-idx3-ubyte.gz: HTTP 404" in err.message
    assert "--data-dir" in err.hint
    assert not any((tmp_path / "cache" / "mnist").iterdir())


def test_download_disabled_tries_no_network(tmp_path, monkeypatch):
    files = mnist_files(tmp_path / "served")
    with Server({f"/{k}": v for k, v in files.items()}) as srv:
        patch_mnist(monkeypatch, files, (f"{srv.url}/",))
        with pytest.raises(DataError, match=r"download disabled \(download=False\)"):
            load_dataset("mnist", download=False)
        monkeypatch.setenv("DLKIT_OFFLINE", "1")
        with pytest.raises(DataError, match=r"download disabled \(DLKIT_OFFLINE=1\)"):
            load_dataset("mnist")
    assert srv.requests == []
