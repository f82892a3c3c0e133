"""Safe tar extraction: nothing lands outside the target folder, and nothing is half-written.

``safe_extract(archive, dest)`` first checks every member of the archive and refuses the whole
archive (``DataError`` naming the member) when one of them

- has an absolute name, or a name with a ``..`` component that leaves the target,
- is a symbolic or hard link whose target resolves outside the target folder,
- is a device, a FIFO or another special file.

Only then does it extract (regular files, folders and links that stay inside), optionally only
the members selected by ``select(name)``, into ``<dest>.partial`` and rename that to ``dest``.
So ``dest`` either does not exist or holds a complete extraction. Python's own ``filter="data"``
is applied as a second line of defence where it exists (3.11.4+ and 3.12+).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from dlkit.errors import DataError

_HINT = "the archive is not the one the dataset's authors publish; delete it and download it again"


def _inside(name: str) -> str | None:
    """``name`` normalised relative to the target, or None if it escapes (or is absolute)."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return None
    norm = posixpath.normpath(name.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


def check_member(member: tarfile.TarInfo, archive: str | Path, links: set[str] | None = None) -> None:
    """Raise ``DataError`` if extracting ``member`` could write or point outside the target.

    ``links`` collects the names of the link members seen so far: a member whose path goes
    through one of them is refused too (a link to "." followed by "link/../x" escapes)."""
    name = member.name
    where = f"{archive}: member '{name}'"
    norm = _inside(name)
    if norm is None:
        raise DataError(f"{where} would be written outside the target folder (path traversal); "
                        "refusing the archive", hint=_HINT)
    if links is not None:
        parts = norm.split("/")
        through = next((p for p in ("/".join(parts[:i]) for i in range(1, len(parts))) if p in links), None)
        if through is not None:
            raise DataError(f"{where} lies beyond the link '{through}'; refusing the archive", hint=_HINT)
        if member.issym() or member.islnk():
            links.add(norm)
    if member.issym() or member.islnk():
        link = member.linkname
        # A symlink's target is relative to the link's folder; a hard link's to the archive root.
        base = posixpath.dirname(posixpath.normpath(name)) if member.issym() else ""
        target = link if link.startswith("/") else posixpath.join(base, link)
        if link.startswith("/") or _inside(target) is None:
            kind = "symbolic" if member.issym() else "hard"
            raise DataError(f"{where} is a {kind} link to '{link}', outside the target folder; "
                            "refusing the archive", hint=_HINT)
    elif not (member.isfile() or member.isdir()):
        raise DataError(f"{where} is a special file (device or FIFO); refusing the archive", hint=_HINT)


def open_tar(archive: str | Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{archive} is not a readable tar archive ({err})", hint=_HINT) from None


def iter_members(tar: tarfile.TarFile, archive: str | Path) -> Iterator[tarfile.TarInfo]:
    """The archive's members, in order, turning a damaged stream into a ``DataError``."""
    try:
        yield from tar
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{archive} is damaged or truncated ({err})", hint=_HINT) from None


def safe_extract(archive: str | Path, dest: str | Path,
                 select: Callable[[str], bool] | None = None) -> Path:
    """Extract ``archive`` (any compression tarfile reads) into ``dest``, atomically.

    ``select(normalised_name)`` picks the regular files to extract (folders follow the files);
    every member is still checked, selected or not. An existing ``dest`` is replaced.
    """
    archive, dest = Path(archive), Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    with open_tar(archive) as tar:
        members = list(iter_members(tar, archive))
        links: set[str] = set()
        for m in members:
            check_member(m, archive, links)
        chosen = [m for m in members if not m.isdir() and (select is None or select(_inside(m.name)))]
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(partial, members=chosen, **kwargs)
        except (tarfile.TarError, OSError, EOFError) as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise DataError(f"cannot extract {archive} into {partial}: {err}", hint=_HINT) from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(partial, dest)
    return dest


def read_members(archive: str | Path, names: dict[str, str]) -> dict[str, bytes]:
    """Read regular files out of ``archive`` without extracting anything.

    ``names`` maps a wanted member name (normalised, e.g. ``cifar-10-batches-bin/test_batch.bin``)
    to a key; returns ``{key: bytes}``. A wanted name that is missing, or not a regular file, is a
    ``DataError``. Every member is checked as in ``safe_extract``.
    """
    out: dict[str, bytes] = {}
    links: set[str] = set()
    with open_tar(archive) as tar:
        for m in iter_members(tar, archive):
            check_member(m, archive, links)
            key = names.get(_inside(m.name) or "")
            if key is None:
                continue
            if not m.isfile():
                raise DataError(f"{archive}: '{m.name}' is not a regular file", hint=_HINT)
            f = tar.extractfile(m)
            try:
                out[key] = f.read() if f is not None else b""
            except (tarfile.TarError, OSError, EOFError) as err:
                raise DataError(f"{archive} is damaged or truncated ({err})", hint=_HINT) from None
    missing = [n for n, k in names.items() if k not in out]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}", hint=_HINT)
    return out
