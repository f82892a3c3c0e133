"""Where a dataset's files are looked for, in order, and downloaded to when they are nowhere.

For a dataset folder ``<name>`` and its required files, the places tried are:

1. the user's ``--data-dir``: the files directly in it, or in ``<data-dir>/<name>/``;
2. the cache: ``$DLKIT_DATA/<name>``, else ``$XDG_CACHE_HOME/dlkit/data/<name>``
   (``~/.cache/dlkit/data/<name>`` by default);
3. system folders: ``<dir>/<name>`` for each ``dir`` in ``SYSTEM_DIRS`` (Debian's
   ``dataset-fashion-mnist`` package installs ``/usr/share/datasets/fashion-mnist``);
4. a download into the cache from each mirror in turn, unless downloads are disabled
   (``download=False`` or ``DLKIT_OFFLINE=1``).

A folder counts only when it holds every required file, each either gzipped (``<file>.gz``) or
not. When nothing works, one ``DataError`` says what was tried and how to fix it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from dlkit.data.download import download_any
from dlkit.errors import DataError

log = logging.getLogger("dlkit")

# System-wide folders that may hold ``<name>/`` dataset folders. Tests monkeypatch this.
SYSTEM_DIRS: list[Path] = [Path("/usr/share/datasets")]

OFFLINE_ENV = "DLKIT_OFFLINE"
CACHE_ENV = "DLKIT_DATA"

# progress(done_bytes, total_bytes_or_None, file_name) while downloading; restarts per file.
FileProgress = Callable[[int, "int | None", str], None]


@dataclass(frozen=True)
class RemoteFile:
    """One required file."""

    name: str  # the name on disk without ".gz": "train-images-idx3-ubyte"
    checksum: str  # of the file the mirrors serve, "md5:<hex>" or "sha256:<hex>"
    remote: str = ""  # the name on the mirrors; "<name>.gz" when empty
    content_sha256: str | None = None  # of the decompressed content, whatever the compression

    @property
    def remote_name(self) -> str:
        return self.remote or f"{self.name}.gz"


@dataclass(frozen=True)
class FileSet:
    """A dataset's folder name, its required files, and the mirrors that serve them."""

    name: str
    files: tuple[RemoteFile, ...]
    mirrors: tuple[str, ...] = ()
    hint: str | None = None  # another way to get the files, e.g. "apt install ..."


@dataclass(frozen=True)
class Found:
    """Where a dataset's files were found."""

    kind: str  # "data-dir", "cache", "system" or "download"
    folder: Path
    paths: dict[str, Path] = field(default_factory=dict)  # RemoteFile.name -> the file

    def describe(self) -> str:
        return f"{self.folder} ({'downloaded' if self.kind == 'download' else self.kind})"


def cache_root() -> Path:
    """The data cache: ``$DLKIT_DATA``, else ``$XDG_CACHE_HOME/dlkit/data``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "dlkit" / "data"


def cache_dir(name: str) -> Path:
    return cache_root() / name


def download_disabled() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def candidates(name: str, data_dir: str | Path | None = None) -> list[tuple[str, Path]]:
    """The folders looked in, in order, as ``(kind, folder)``."""
    out: list[tuple[str, Path]] = []
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        out.append(("data-dir", d))
        if d.is_dir():
            out.append(("data-dir", d / name))
    out.append(("cache", cache_dir(name)))
    out += [("system", Path(s) / name) for s in SYSTEM_DIRS]
    return out


def find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever is a file (raw first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _look(folder: Path, files: Sequence[RemoteFile]) -> tuple[dict[str, Path], list[str]]:
    found, missing = {}, []
    for f in files:
        path = find_file(folder, f.name)
        if path is None:
            missing.append(f.name)
        else:
            found[f.name] = path
    return found, missing


def locate(fileset: FileSet, data_dir: str | Path | None = None) -> Found | None:
    """The first folder that holds every required file, without downloading; None if none."""
    found, _ = _search(fileset, data_dir)
    return found


def _search(fileset: FileSet, data_dir: str | Path | None) -> tuple[Found | None, list[str]]:
    tried: list[str] = []
    for kind, folder in candidates(fileset.name, data_dir):
        if not folder.is_dir():
            tried.append(f"{folder} ({kind}: no such folder)")
            continue
        paths, missing = _look(folder, fileset.files)
        if not missing:
            return Found(kind, folder, paths), tried
        tried.append(f"{folder} ({kind}: missing {', '.join(m + '[.gz]' for m in missing)})")
    return None, tried


def fetch(
    fileset: FileSet,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    progress: FileProgress | None = None,
) -> Found:
    """Find the files, downloading the missing ones into the cache if allowed."""
    found, tried = _search(fileset, data_dir)
    if found is not None:
        if data_dir is not None and found.kind != "data-dir":
            log.warning("%s is not in --data-dir %s; using %s",
                        fileset.name, data_dir, found.folder)
        return found

    offline = download_disabled()
    if not download or offline:
        why = f"{OFFLINE_ENV}=1" if offline else "download=False"
        tried.append(f"download disabled ({why})")
        raise _not_found(fileset, tried, enable=f"unset {OFFLINE_ENV}" if offline else "")
    if not fileset.mirrors:
        tried.append("no download mirror is known")
        raise _not_found(fileset, tried)

    folder = cache_dir(fileset.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the data cache {folder}: {err.strerror or err}",
                        hint=f"set {CACHE_ENV} to a writable folder, or pass --data-dir") from None
    paths = _look(folder, fileset.files)[0]
    for f in fileset.files:
        if f.name in paths:
            continue
        failures: list[str] = []
        urls = [m.rstrip("/") + "/" + f.remote_name for m in fileset.mirrors]
        report = (lambda d, t, _n=f.remote_name: progress(d, t, _n)) if progress else None
        log.info("downloading %s into %s", f.remote_name, folder)
        try:
            paths[f.name] = download_any(
                urls, folder / f.remote_name, checksum=f.checksum, progress=report,
                failures=failures,
            )
        except DataError as err:
            tried += failures
            raise _not_found(fileset, tried, download_failed=True) from err
    return Found("download", folder, paths)


def _not_found(
    fileset: FileSet, tried: list[str], *, enable: str | None = None,
    download_failed: bool = False,
) -> DataError:
    files = ", ".join(f.name + "[.gz]" for f in fileset.files)
    what = "could not be downloaded" if download_failed else "not found"
    fixes = [f"pass --data-dir DIR with {files}"]
    if fileset.hint:
        fixes.append(fileset.hint)
    if enable is not None:
        fixes.append(f"allow downloads ({enable})" if enable else "allow downloads")
    elif download_failed:
        fixes.append("check the network and run again (partial downloads resume)")
    err = DataError(f"dataset '{fileset.name}' {what}; tried: " + "; ".join(tried),
                    hint="; or ".join(fixes))
    err.tried = list(tried)  # type: ignore[attr-defined]
    return err
