"""The one write path for every folder dlkit creates (artifacts, run folders, exports).

A command that writes ``DEST`` does it like a database commits a transaction:

1. It takes an exclusive lock on ``DEST`` for as long as it runs (``flock`` on ``.DEST.lock``
   beside it, holding the writer's pid). A second writer gets one line naming that pid.
2. It builds the result in a folder it created itself: ``DEST.partial.new-PID`` for a one-shot
   write, ``DEST.partial`` for a training run (which keeps its checkpoint there, to resume). A
   ``DEST.partial`` or a symbolic link already there is never reused or followed (except a training
   run's own checkpoint folder, resumed on request): the error says what is there and how to go on.
   A training run's work folder is created complete or not at all: staged under the temporary
   name, given its epoch-0 checkpoint, then renamed into place.
3. It renames the work folder to ``DEST`` without ever replacing anything (``renameat2`` with
   ``RENAME_NOREPLACE``). If ``DEST`` appeared meanwhile, the finished work goes to the first free
   ``DEST-N`` instead, and the caller reports where.

Every ``OSError`` on the way (missing parent, not a directory, read-only, no space, permission)
becomes one :class:`OutputError` line naming the path and what the system said.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from dlkit.errors import OutputError

log = logging.getLogger("dlkit")

PARTIAL = ".partial"
STAGING = ".partial.new-"  # DEST.partial.new-PID: a work folder being created


_HINTS = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "free some space or choose another --out",
    errno.EROFS: "that file system is read-only: choose another --out",
    errno.EACCES: "you may not write there: choose another --out",
    errno.EPERM: "you may not write there: choose another --out",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another --out",
    errno.ENOENT: "a part of that path does not exist: check --out",
    errno.ENAMETOOLONG: "choose a shorter --out",
}


def os_error(exc: OSError, path: Path | str | None = None) -> OutputError:
    """One line for an OSError met while writing ``path``."""
    where = path or exc.filename or "the output"
    what = os.strerror(exc.errno) if exc.errno else str(exc)
    return OutputError(f"cannot write {where}: {what}", hint=_HINTS.get(exc.errno, "choose another --out"))


def work_folder(final: Path) -> Path:
    """Where ``final`` is assembled before the rename (also holds a resumable checkpoint)."""
    return final.with_name(final.name + PARTIAL)


def _lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


# ------------------------------------------------------------------------------------------ locks

_held: dict[Path, list] = {}  # lock path -> [fd, count]: a process may take its own lock again


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


def acquire(final: Path) -> Path:
    """Take the exclusive lock on ``final`` (re-entrant within this process)."""
    shown = Path(final)  # as the user wrote it, for messages
    final = Path(os.path.abspath(final))
    lock = _lock_path(final)
    if lock in _held:
        _held[lock][1] += 1
        return lock
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a parent folder should be
        raise os_error(OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)), shown) from None
    except OSError as exc:
        raise os_error(exc, shown) from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise os_error(exc, shown) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{shown} is being written by {_holder(lock)}",
                              hint="wait for it to finish, or choose another --out") from None
        # The file we locked may have been unlinked by a holder that just released it: retry then.
        try:
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[lock] = [fd, 1]
    _clear_staging(final)
    return lock


def release(final: Path) -> None:
    lock = _lock_path(Path(os.path.abspath(final)))
    entry = _held.get(lock)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[lock]
    try:
        os.unlink(lock)  # while still locked: a waiter that opened it retries on the new file
    except OSError:
        pass
    os.close(entry[0])


def _clear_staging(final: Path) -> None:
    """Remove work folders left half-created by a writer that was killed (we hold the lock)."""
    for stale in final.parent.glob(f"{final.name}{STAGING}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------------------ the folders


def check_free(final: Path, *, resumable: Callable[[Path], bool] | None = None, resume: bool = False,
               resume_hint: str = "add --resume to continue it") -> bool:
    """Check that ``final`` can be written; returns True when its work folder is to be resumed.

    ``resumable(work)`` tells whether a work folder holds something to continue (a training
    checkpoint); without it no work folder is ever reused."""
    final = Path(final)
    work = work_folder(final)
    if os.path.lexists(final):
        raise OutputError(f"{final} already exists", hint="choose another --out, or remove it first")
    if work.is_symlink():
        raise OutputError(f"{work} is a symbolic link; dlkit never writes through one",
                          hint=f"remove it (rm {work}) or choose another --out")
    if not os.path.lexists(work):
        if resume:
            raise OutputError(f"nothing to resume: {work} does not exist",
                              hint="drop --resume to start a new run, or pass the --out of the interrupted run")
        return False
    if not work.is_dir():
        raise OutputError(f"{work} is in the way (not a folder)", hint=f"remove it (rm {work}) or choose another --out")
    if resumable is not None and resumable(work):
        if resume:
            return True
        raise OutputError(f"an unfinished run is in {work}",
                          hint=f"{resume_hint}, or remove that folder (rm -r {work}) to start over")
    if resume:
        raise OutputError(f"nothing to resume: {work} holds no checkpoint",
                          hint=f"it is left from a run that stopped before training began: remove it (rm -r {work})")
    raise OutputError(f"{work} is in the way: it is left from an interrupted run",
                      hint=f"if that was `dlkit train`, continue it with the same command and --resume; "
                           f"else remove it (rm -r {work})")


def staging_folder(final: Path) -> Path:
    """A fresh folder beside ``final`` that only this process uses (``DEST.partial.new-PID``)."""
    final = Path(final)
    staging = final.with_name(f"{final.name}{STAGING}{os.getpid()}")
    if staging.is_dir() and not staging.is_symlink():  # ours, from an earlier failed write: we hold the lock
        shutil.rmtree(staging)
    try:
        os.mkdir(staging, 0o755)
    except OSError as exc:
        raise os_error(exc, staging) from None
    return staging


def create_work(final: Path, populate: Callable[[Path], None] | None = None) -> Path:
    """Create ``final``'s work folder, fresh and owned by this process, with its first contents.

    It is staged under a temporary name and renamed into place once ``populate(folder)`` is done,
    so a work folder is never seen half-created."""
    final = Path(final)
    work = work_folder(final)
    staging = staging_folder(final)
    try:
        if populate is not None:
            populate(staging)
        rename_noreplace(staging, work)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno == errno.EEXIST:
            raise OutputError(f"{work} appeared while this run was starting",
                              hint="is another program writing there? choose another --out") from None
        raise os_error(exc, work) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return work


def commit(work: Path, final: Path) -> Path:
    """Rename the finished ``work`` folder to ``final``, never replacing anything: if ``final``
    appeared meanwhile, to the first free ``final-N``. Returns where it went."""
    final = Path(final)
    target = final
    for n in range(2, 1000):
        try:
            rename_noreplace(work, target)
        except FileExistsError:
            target = final.with_name(f"{final.name}-{n}")
            continue
        except OSError as exc:
            raise os_error(exc, target) from None
        if target != final:
            log.warning("warning: %s appeared while this run was writing; the result is kept at %s instead",
                        final, target)
        return target
    raise OutputError(f"{final} and 998 numbered siblings exist", hint="choose another --out")


def rename_noreplace(src: Path, dst: Path) -> None:
    """``rename(src, dst)`` that fails with FileExistsError instead of replacing ``dst`` (Linux
    ``renameat2(RENAME_NOREPLACE)``; elsewhere a check just before, which our lock makes safe
    against other dlkit writers)."""
    fn = getattr(_libc(), "renameat2", None) if _libc() is not None else None
    if fn is not None:
        at_fdcwd, rename_noreplace_flag = -100, 1
        if fn(at_fdcwd, os.fsencode(str(src)), at_fdcwd, os.fsencode(str(dst)), rename_noreplace_flag) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # else: the file system lacks it; fall back
            raise (FileExistsError if err == errno.EEXIST else OSError)(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


class Destination:
    """``with Destination(path) as dest:`` holds the lock on ``path`` for the block."""

    def __init__(self, final: Path | str):
        self.final = Path(final)
        self.work = work_folder(self.final)

    def __enter__(self) -> "Destination":
        acquire(self.final)
        return self

    def __exit__(self, *exc) -> None:
        release(self.final)


def write_file(path: Path | str, data: bytes) -> Path:
    """Write one file the user named (a plot, a report) whole or not at all: a temporary file beside
    it, renamed over it. Folders above it are made; an OSError becomes one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise os_error(exc, path) from None
    return path


def save_figure(fig, path: Path | str, **kwargs) -> Path:
    """A matplotlib figure as a PNG at ``path`` (see write_file)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    return write_file(path, buf.getvalue())
