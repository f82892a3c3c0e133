"""Downloading one file safely: resumable, verified, and atomic.

``download`` streams to ``<dest>.part``, resumes a partial ``.part`` with an HTTP Range request
(starting over when the server ignores it), verifies the checksum, and only then renames the file
into place with ``os.replace``. ``dest`` therefore either does not exist or holds the verified
file; a failed checksum deletes the partial file. ``download_any`` tries mirrors in order.

Progress is reported through ``progress(done_bytes, total_bytes_or_None)``; nothing is printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence

from dlkit import __version__
from dlkit.errors import DataError

log = logging.getLogger("dlkit")

Progress = Callable[[int, "int | None"], None]

TIMEOUT = 30.0  # seconds, for connecting and for each read
CHUNK = 1 << 16
ALGORITHMS = ("md5", "sha1", "sha256", "sha512")
_USER_AGENT = f"dlkit/{__version__} (+urllib)"


def parse_checksum(checksum: str) -> tuple[str, str]:
    """``"md5:abc..."`` -> ``("md5", "abc...")``; the digest is checked for length and hex."""
    algo, sep, digest = checksum.partition(":")
    algo, digest = algo.strip().lower(), digest.strip().lower()
    if not sep or algo not in ALGORITHMS:
        raise ValueError(f"checksum {checksum!r} should look like 'sha256:<hex>' or 'md5:<hex>'")
    size = hashlib.new(algo).digest_size * 2
    if len(digest) != size or not re.fullmatch(r"[0-9a-f]+", digest):
        raise ValueError(f"checksum {checksum!r}: a {algo} digest has {size} hex digits")
    return algo, digest


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str | Path, checksum: str) -> tuple[bool, str]:
    """Whether ``path`` matches ``checksum``, and its actual ``algo:digest``."""
    algo, digest = parse_checksum(checksum)
    actual = file_digest(path, algo)
    return actual == digest, f"{algo}:{actual}"


class _Restart(Exception):
    """The partial file cannot be resumed from this response: start over from byte 0."""


def download(
    url: str,
    dest: str | Path,
    *,
    checksum: str,
    progress: Progress | None = None,
    timeout: float = TIMEOUT,
) -> Path:
    """Download ``url`` to ``dest``, verified against ``checksum`` (``"md5:..."``/``"sha256:..."``).

    Raises ``DataError`` when the server cannot be reached, the transfer breaks (the ``.part``
    file is kept so the next call resumes), or the checksum differs (the ``.part`` is deleted).
    """
    parse_checksum(checksum)  # a malformed checksum is a bug: fail before touching the network
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {dest.parent}: {err.strerror or err}",
                        hint="set DLKIT_DATA to a writable folder") from None
    with _lock(dest):
        if dest.exists() and verify(dest, checksum)[0]:
            return dest  # another process finished it while we waited for the lock
        try:
            _fetch(url, part, progress, timeout)
        except _Restart:
            part.unlink(missing_ok=True)
            _fetch(url, part, progress, timeout)
        ok, actual = verify(part, checksum)
        if not ok:
            part.unlink(missing_ok=True)
            raise DataError(
                f"checksum mismatch for {url}: expected {checksum.lower()}, got {actual}",
                hint="the mirror serves a different file; try again later or another mirror",
            )
        os.replace(part, dest)
    return dest


def download_any(
    urls: Sequence[str],
    dest: str | Path,
    *,
    checksum: str,
    progress: Progress | None = None,
    timeout: float = TIMEOUT,
    failures: list[str] | None = None,
) -> Path:
    """Try each mirror URL in order; the first verified download wins.

    Each failure is appended to ``failures`` as ``"<url>: <why>"``; if every mirror fails, one
    ``DataError`` lists them all.
    """
    tried = [] if failures is None else failures
    start = len(tried)
    for url in urls:
        try:
            return download(url, dest, checksum=checksum, progress=progress, timeout=timeout)
        except DataError as err:
            log.info("download of %s failed: %s", url, err.message)
            tried.append(f"{url}: {err.message}")
    why = "; ".join(tried[start:]) if urls else "no mirror known"
    raise DataError(
        f"could not download {Path(dest).name}: {why}",
        hint="check the network, or place the file there yourself",
    )


def _fetch(url: str, part: Path, progress: Progress | None, timeout: float) -> None:
    """Stream ``url`` into ``part``, resuming from its current size when it already exists."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the partial file is already complete (or too long)
            log.info("server refused resuming %s at byte %d; starting over", url, offset)
            raise _Restart() from None
        raise DataError(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise DataError(f"unreachable ({_reason(err.reason)})") from None
    except (OSError, http.client.HTTPException) as err:
        raise DataError(f"unreachable ({_reason(err)})") from None

    with response:
        status = getattr(response, "status", None) or 200
        total = _int(response.headers.get("Content-Length"))
        if offset and status == 206:
            start, full = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                log.info("server resumed %s at byte %s, not %d; starting over", url, start, offset)
                raise _Restart()
            total = full if full is not None else (offset + total if total is not None else None)
            mode = "ab"
        else:
            if offset:
                log.info("server ignored the Range request for %s; starting over", url)
            offset, mode = 0, "wb"
        done = offset
        if progress:
            progress(done, total)
        try:
            out = open(part, mode)
        except OSError as err:
            raise DataError(f"cannot write {part}: {err.strerror or err}") from None
        with out:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    raise DataError(
                        f"transfer broke after {done} bytes ({_reason(err)}); run again to resume"
                    ) from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as err:
                    raise DataError(f"cannot write {part}: {err.strerror or err}") from None
                done += len(chunk)
                if progress:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
    if total is not None and done != total:
        raise DataError(f"transfer ended after {done} of {total} bytes; run again to resume")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``"bytes 100-199/200"`` -> ``(100, 200)``; unknown parts are None."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (int(m.group(3)) if m.group(3) != "*" else None)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _reason(err: object) -> str:
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err) or type(err).__name__


@contextlib.contextmanager
def _lock(dest: Path) -> Iterator[None]:
    """Serialise downloads into one folder across processes (DDP workers share a cache).

    Locks the folder itself, so no lock file is left behind; a no-op where flock is missing.
    """
    try:
        import fcntl
        fd = os.open(dest.parent, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
