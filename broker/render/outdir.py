"""The output root and the execution directories in it: the broker's alone, memory-backed.

- The root must be a real directory (no symlink) on tmpfs/ramfs (unless ``allow_disk``), owned
  by the broker's uid and writable by nobody else; a root someone else prepared is refused.
- Each execution directory is created by the broker (an existing one is refused, never
  reused) and recognised afterwards by its device and inode, so a directory swapped in
  behind the broker's back is detected instead of written into or wiped.
- The process that created an execution directory holds an exclusive ``flock`` on it for as
  long as the execution lives (it is created under a hidden name, locked, then renamed into
  place), so at start a broker can tell leftovers of a killed process — unlocked — from
  directories another live broker is using, and sweep only the former.
- Files are 0400 in a 0700 directory. When the reader is another uid (the sidecar's runner),
  that one uid gets read access through a POSIX ACL; the group gets nothing.
- Every write is a temp file opened with ``O_EXCL|O_NOFOLLOW`` and renamed relative to the
  directory's descriptor, so a planted symlink cannot redirect it.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from broker import logs
from broker.errors import RenderError
from broker.records import record

MEMORY_FILESYSTEMS = {"tmpfs", "ramfs"}
DIR_MODE, FILE_MODE = 0o700, 0o400
_ACL_XATTR = "system.posix_acl_access"
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) for every mount of this process's namespace."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            separator = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")
            mounts.append((point, fields[separator + 1]))
    return mounts


def filesystem_type(path: Path) -> str:
    """The filesystem type of the mount that holds ``path`` (longest mount-point prefix)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for point, fstype in _mounts():
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def is_memory_backed(path: Path) -> bool:
    return filesystem_type(path) in MEMORY_FILESYSTEMS


def default_out_dir() -> Path:
    """``$XDG_RUNTIME_DIR/stigmer-broker`` when that is memory-backed, else under /dev/shm."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir() and is_memory_backed(Path(runtime)):
        return Path(runtime) / "stigmer-broker"
    return Path("/dev/shm") / f"stigmer-broker-{os.geteuid()}"  # noqa: S108 - owner-checked


def _acl(owner_bits: int, reader_bits: int, reader_uid: int) -> bytes:
    """A POSIX access ACL: the owner keeps ``owner_bits``, one named user gets
    ``reader_bits``, the group and others nothing."""
    entries = [
        (_ACL_USER_OBJ, owner_bits, _ACL_UNDEFINED_ID),
        (_ACL_USER, reader_bits, reader_uid),
        (_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED_ID),
        (_ACL_MASK, reader_bits, _ACL_UNDEFINED_ID),
        (_ACL_OTHER, 0, _ACL_UNDEFINED_ID),
    ]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def grant_reader(fd: int, reader_uid: int | None, directory: bool) -> None:
    """Let exactly ``reader_uid`` read (and, for a directory, enter) what ``fd`` names; the
    owner keeps its mode (0700 directories, 0400 files). No-op for the owner itself."""
    if reader_uid is None or reader_uid == os.geteuid():
        return
    owner, reader = (0o7, 0o5) if directory else (0o4, 0o4)
    os.setxattr(fd, _ACL_XATTR, _acl(owner, reader, reader_uid))


@contextmanager
def open_directory(path: Path | str, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


@record(frozen=True)
class ExecutionDirectory:
    """A directory the broker created; ``identity`` is its (device, inode); ``lock_fd`` holds
    its ``flock`` while the execution lives (-1: not held)."""

    path: Path
    identity: tuple[int, int]
    lock_fd: int = -1

    def release(self) -> None:
        """Drop the lock (after the wipe): a later sweep may then remove what is left."""
        if self.lock_fd >= 0:
            with suppress(OSError):
                os.close(self.lock_fd)

    @contextmanager
    def open(self) -> Iterator[int]:
        """Its descriptor, after checking it is still the directory the broker created."""
        with open_directory(self.path) as fd:
            status = os.fstat(fd)
            if (status.st_dev, status.st_ino) != self.identity:
                logs.security("security: execution directory replaced", "tampering",
                              directory=str(self.path))  # fmt: skip
                raise RenderError(f"{self.path}: replaced by another directory (tampering?)")
            yield fd


def write_atomic(dir_fd: int, name: str, data: bytes, reader_uid: int | None = None) -> None:
    """Temp file + rename inside ``dir_fd``; never follows a symlink. The file ends 0400."""
    temp = f".{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(temp, flags, FILE_MODE, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # exactly, whatever the umask
            grant_reader(fd, reader_uid, directory=False)
            view = memoryview(data)
            while view:  # a regular file on tmpfs takes it in one write; loop all the same
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        raise


_NEW = ".new-"  # prefix of a directory being created (locked, then renamed into place)


def _rename_new(root_fd: int, temp: str, name: str) -> None:
    """Rename ``temp`` to ``name``, refusing to replace anything (the root is ours alone)."""
    try:
        os.lstat(name, dir_fd=root_fd)
    except FileNotFoundError:
        os.rename(temp, name, src_dir_fd=root_fd, dst_dir_fd=root_fd)
        return
    raise FileExistsError(name)


def _unlocked_leftover(root_fd: int, name: str) -> int | None:
    """A locked descriptor of ``name`` if it is a directory of ours that nobody holds."""
    try:
        status = os.lstat(name, dir_fd=root_fd)
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
            return None
        if name.startswith(_NEW) and time.time() - status.st_ctime < 60:
            return None  # being created right now
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None  # a live process holds it
    return fd


@record(frozen=True)
class OutputRoot:
    """Where execution directories go. ``check()`` once at start, then ``create()`` each."""

    path: Path
    allow_disk: bool = False
    mode: int = DIR_MODE  # 0711 when callers of other uids must reach their directories

    def check(self) -> None:
        """Create the root if missing; refuse one that is disk-backed or not the broker's."""
        try:
            self.path.mkdir(mode=self.mode, parents=True, exist_ok=True)
            status = os.lstat(self.path)
        except OSError as exc:
            raise RenderError(f"--out {self.path}: cannot create ({exc.strerror})") from None
        if stat.S_ISLNK(status.st_mode) or not stat.S_ISDIR(status.st_mode):
            raise RenderError(f"--out {self.path}: not a directory (a symlink is refused)")
        if status.st_uid != os.geteuid():
            raise RenderError(
                f"--out {self.path}: owned by uid {status.st_uid}, not by the broker "
                f"(uid {os.geteuid()}); someone else prepared it: use another directory"
            )
        if status.st_mode & 0o022:
            raise RenderError(
                f"--out {self.path}: writable by group or others "
                f"(mode {stat.S_IMODE(status.st_mode):04o}); chmod go-w it or use another"
            )
        if not self.allow_disk and not is_memory_backed(self.path):
            raise RenderError(
                f"--out {self.path}: {filesystem_type(self.path)} is disk-backed; secrets go "
                "only to tmpfs (use a memory-backed directory, or --allow-disk to override)"
            )
        os.chmod(self.path, self.mode)  # ours: exactly the mode this front end needs

    def create(self, execution_id: str, reader_uid: int | None = None) -> ExecutionDirectory:
        """A new 0700 directory for the execution (readable by ``reader_uid`` via an ACL),
        locked by this process until :meth:`ExecutionDirectory.release`."""
        directory = self.path / execution_id
        temp = f"{_NEW}{execution_id}-{os.urandom(4).hex()}"  # secrets.token_hex, lighter
        try:
            with open_directory(self.path) as root_fd:
                os.mkdir(temp, DIR_MODE, dir_fd=root_fd)
                fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.fchmod(fd, DIR_MODE)  # exactly, whatever the umask
                    grant_reader(fd, reader_uid, directory=True)
                    status = os.fstat(fd)
                    _rename_new(root_fd, temp, execution_id)
                except BaseException:
                    os.close(fd)
                    with suppress(OSError):
                        os.rmdir(temp, dir_fd=root_fd)
                    raise
        except FileExistsError:
            raise RenderError(f"{directory}: already exists (is the execution running?)") from None
        except OSError as exc:
            raise RenderError(f"{directory}: cannot create ({exc.strerror})") from None
        return ExecutionDirectory(directory, (status.st_dev, status.st_ino), fd)

    def sweep(self) -> list[str]:
        """Remove execution directories no live process holds (their lock is free): what a
        killed broker left. Returns their names."""
        from broker.render.wipe import wipe_and_release  # the wipe depends on this module

        swept = []
        with open_directory(self.path) as root_fd:
            for name in os.listdir(root_fd):
                fd = _unlocked_leftover(root_fd, name)
                if fd is None:
                    continue
                status = os.fstat(fd)
                leftover = ExecutionDirectory(self.path / name, (status.st_dev, status.st_ino), fd)
                wipe_and_release(leftover)
                swept.append(name)
        return swept

    def supports_acl(self) -> bool:
        """Whether the root's filesystem stores POSIX ACLs (probed on a scratch file)."""
        probe = f".acl-probe.{os.getpid()}"
        with open_directory(self.path) as root_fd:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=root_fd)
            try:
                grant_reader(fd, os.geteuid() + 1, directory=False)
            except OSError:
                return False
            finally:
                os.close(fd)
                os.unlink(probe, dir_fd=root_fd)
        return True
