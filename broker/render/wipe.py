"""Removing an execution directory that a hostile runner may have filled with anything.

The runner can leave regular files, sub-directories, FIFOs, sockets, symlinks and files with
mode 000. The wipe finishes in bounded time whatever it finds: it opens only regular files the
broker owns (never a FIFO, device or symlink, so nothing can block it), overwrites them with
zeros after making them writable (through an ``O_PATH`` descriptor, so a 0400 or a 000 file is
overwritten by a non-root broker too), unlinks everything else without opening it, descends
into sub-directories to a bounded depth, and reports what it could not remove.
"""

from __future__ import annotations

import os
import stat

from broker.errors import RenderError
from broker.records import field, record
from broker.render.outdir import ExecutionDirectory, open_directory

MAX_DEPTH = 32
MAX_ENTRIES = 10_000
MAX_OVERWRITE = 64 * 1024 * 1024


@record
class WipeReport:
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "name: reason", never contents
    budget: int = MAX_ENTRIES


def _overwrite(dir_fd: int, name: str) -> None:
    """Zero a regular file the broker owns, whatever its mode (0400, or a runner's 000).

    An ``O_PATH`` descriptor needs no permission and follows no link; the mode is changed and
    the file reopened for writing through ``/proc/self/fd``, so the same inode is written.
    """
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid():
            return
        os.chmod(f"/proc/self/fd/{fd}", 0o600)
        writer = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            remaining = min(status.st_size, MAX_OVERWRITE)
            zeros = b"\0" * min(remaining, 1 << 20)
            while remaining > 0:
                remaining -= os.write(writer, zeros[:remaining])
        finally:
            os.close(writer)
    finally:
        os.close(fd)


def _remove_entry(dir_fd: int, name: str, prefix: str, depth: int, report: WipeReport) -> None:
    where = f"{prefix}{name}"
    report.budget -= 1
    try:
        status = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISDIR(status.st_mode):
            _remove_tree(dir_fd, name, where + "/", depth + 1, report)
            os.rmdir(name, dir_fd=dir_fd)
        else:
            if stat.S_ISREG(status.st_mode):
                _overwrite_quietly(dir_fd, name, where, report)
            os.unlink(name, dir_fd=dir_fd)
        report.removed.append(where)
    except OSError as exc:
        report.failed.append(f"{where}: {exc.strerror or type(exc).__name__}")


def _overwrite_quietly(dir_fd: int, name: str, where: str, report: WipeReport) -> None:
    """Overwrite if possible; the file is unlinked either way."""
    try:
        _overwrite(dir_fd, name)
    except OSError as exc:
        report.failed.append(f"{where}: not overwritten ({exc.strerror or type(exc).__name__})")


def _remove_tree(parent_fd: int, name: str, prefix: str, depth: int, report: WipeReport) -> None:
    if depth > MAX_DEPTH:
        raise OSError(0, f"nested deeper than {MAX_DEPTH} levels")
    status = os.lstat(name, dir_fd=parent_fd)
    if status.st_uid == os.geteuid():
        os.chmod(name, 0o700, dir_fd=parent_fd)  # a runner's mode-000 directory
    with open_directory(name, dir_fd=parent_fd) as fd:
        _remove_contents(fd, prefix, depth, report)


def _remove_contents(dir_fd: int, prefix: str, depth: int, report: WipeReport) -> None:
    for _ in range(3):  # the runner may still be adding entries
        entries = os.listdir(dir_fd)
        if not entries:
            return
        for name in entries:
            if report.budget <= 0:
                raise OSError(0, f"more than {MAX_ENTRIES} entries")
            _remove_entry(dir_fd, name, prefix, depth, report)


def wipe(directory: ExecutionDirectory) -> WipeReport:
    """Overwrite and remove everything in ``directory``, then the directory itself."""
    report = WipeReport()
    try:
        with directory.open() as fd:
            _remove_contents(fd, "", 0, report)
    except FileNotFoundError:
        return report
    except RenderError as exc:
        report.failed.append(str(exc))
        return report
    except OSError as exc:
        report.failed.append(f"{directory.path}: {exc.strerror or type(exc).__name__}")
    try:
        os.rmdir(directory.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        report.failed.append(f"{directory.path}: {exc.strerror or type(exc).__name__}")
    return report


def wipe_and_release(directory: ExecutionDirectory) -> WipeReport:
    """:func:`wipe`, then drop the directory's lock (a later sweep may remove what is left)."""
    try:
        return wipe(directory)
    finally:
        directory.release()
