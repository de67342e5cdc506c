"""Small durable-file primitives: the data directory lock, atomic replace, durable copies, the
node id file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator

from pykv.errors import CorruptData, InvalidArgument, StoreLocked


def fsync_dir(path: str) -> None:
    """fsync a directory so that the names created, renamed or deleted in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(path: str) -> None:
    """Create path (and parents) and fsync each new directory's parent. InvalidArgument when
    path, or one of its parents, is a file."""
    path = os.path.abspath(path)
    missing = []
    probe = path
    while not os.path.isdir(probe):
        if os.path.exists(probe):
            raise InvalidArgument(f"{probe} is a file, not a store's directory")
        missing.append(probe)
        probe = os.path.dirname(probe)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            pass
        fsync_dir(os.path.dirname(directory))


def replace_atomically(path: str, data: bytes) -> None:
    """Write data to path so that a crash leaves either the old file or the new one, whole.

    Temp file, write, fsync, rename over path, fsync the directory (the rename is durable only
    once the directory entry is).
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def new_store_directory(path: str, what: str) -> None:
    """Create ``path`` (durably) for a new store; InvalidArgument if it exists and is not empty
    (``what`` writes the store: it says so)."""
    _refuse_unless_new(path, what)
    make_dirs_durably(path)


def refuse_node_directory(path: str) -> None:
    """InvalidArgument for a cluster node's data directory where a store's is expected: its
    log is a node's, not a store's, and opening it as one would read it as damaged."""
    if os.path.exists(os.path.join(path, "IDENTITY")) or os.path.isdir(os.path.join(path, "shards")):
        raise InvalidArgument(
            f"{path} is a cluster node's data directory, not an embedded store: reach its keys "
            "through the cluster (pykv.connect, pykv get --addresses), or check it, stopped, "
            f"with pykv check {path}"
        )


def _refuse_unless_new(path: str, what: str) -> None:
    if os.path.isdir(path) and os.listdir(path):
        raise InvalidArgument(f"{path} is not empty: {what} writes a new store")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgument(f"{path} is a file, not a store's directory")


@contextlib.contextmanager
def building_directory(path: str, what: str) -> Iterator[str]:
    """A new directory beside ``path`` to build a store in: renamed to ``path`` (durably) when
    the block ends, removed when it raises, so ``path`` never holds half a store.
    InvalidArgument if ``path`` exists and is not empty (``what`` writes the store)."""
    path = os.path.abspath(path)
    _refuse_unless_new(path, what)
    parent = os.path.dirname(path)
    make_dirs_durably(parent)
    building = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    try:
        yield building
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(path)  # empty (checked above): the rename takes its place
        os.rename(building, path)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def copy_durably(copies: list[tuple[str, str, int | None]],
                 progress: Callable[[int, int], None] | None = None) -> int:
    """Copy each (source, target, length or None for all of it) and fsync it, then the targets'
    directories; ``progress(bytes done, bytes in all)``. Returns the bytes copied."""
    sizes = [os.path.getsize(src) if length is None else length for src, _, length in copies]
    total, done = sum(sizes), 0
    for (src, dst, _), size in zip(copies, sizes, strict=True):
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            left = size
            while left:
                chunk = fin.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise CorruptData(f"{src} ended {left} bytes short while being copied")
                fout.write(chunk)
                left -= len(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            fout.flush()
            os.fsync(fout.fileno())
    for directory in sorted({os.path.dirname(os.path.abspath(dst)) for _, dst, _ in copies}):
        fsync_dir(directory)
    return done


_COPY_CHUNK = 1 << 20

# The file of a store's directory where a cluster backup keeps the resolvers registered on
# the cluster (JSON, {prefix: built-in name}), which `pykv restore` registers again.
RESOLVERS_FILE = "RESOLVERS"


class DirectoryLock:
    """A flock on ``<dir>/LOCK``, held while a Storage (or a cluster node) has the directory
    open: exclusive for a writer, shared (``shared=True``) for read-only opens, so that many
    readers may share a directory no writer has open.

    flock locks belong to the open file description, so a second open in the same process
    conflicts too, and the kernel drops the lock when the process dies (no stale lock files).
    A child made by fork() shares that description: it closes its copy at once, or the lock
    would outlive the parent's close for as long as the child runs.
    """

    def __init__(self, directory: str, *, shared: bool = False) -> None:
        self.path = os.path.join(directory, "LOCK")
        fd = self._open(shared)
        if fd is None:
            self._fd: int | None = None  # read-only media: no writer can be there either
            return
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            holders = _lock_holders(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLocked(
                    f"{directory} is already open (lock {self.path} held by {holders}); "
                    "close the other store (or stop the other node) or use another directory"
                ) from None
            raise
        if not shared:  # a reader leaves the file as it is: it may be on read-only media
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(self)

    def _open(self, shared: bool) -> int | None:
        """The LOCK file's descriptor; None for a reader that cannot create a missing one."""
        if shared and os.path.exists(self.path):
            return os.open(self.path, os.O_RDONLY)  # flock needs no write access
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if shared and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return None
            raise

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock


def _lock_holders(fd: int) -> str:
    """Who holds the flock on fd's file, as a message says it: from /proc/locks (Linux),
    else the pid the last writer left in the file."""
    inode = os.fstat(fd).st_ino
    writers, readers = [], []
    with contextlib.suppress(OSError):
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()  # 1: FLOCK ADVISORY WRITE 1234 08:01:5678 0 EOF
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
                    (writers if fields[3] == "WRITE" else readers).append(fields[4])
    if readers and not writers:
        readers = list(dict.fromkeys(readers))
        return f"pid{'s' if len(readers) > 1 else ''} {', '.join(readers)} (opened read-only)"
    if writers:
        return f"pid {writers[0]}"
    return f"pid {os.pread(fd, 64, 0).decode('ascii', 'replace').strip() or 'unknown'}"


_HELD: weakref.WeakSet[DirectoryLock] = weakref.WeakSet()


def _let_go_after_fork() -> None:
    for lock in list(_HELD):
        lock.release()  # the child's descriptor only: the parent holds the lock still
    _HELD.clear()


os.register_at_fork(after_in_child=_let_go_after_fork)


def load_or_create_node_id(directory: str) -> int:
    """A stable random 63-bit node id, created at the first open and kept in ``NODE_ID``."""
    node_id = load_node_id(directory)
    if node_id is None:
        node_id = secrets.randbits(63) | 1  # never 0: 0 reads as "no node" in clocks
        replace_atomically(os.path.join(directory, "NODE_ID"), f"{node_id}\n".encode())
    return node_id


def load_node_id(directory: str) -> int | None:
    """The node id kept in ``directory/NODE_ID``; None when there is none yet."""
    path = os.path.join(directory, "NODE_ID")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("ascii", "replace").strip()
    except FileNotFoundError:
        return None
    if not text.isdigit() or int(text) <= 0:
        raise CorruptData(f"{path} does not hold a node id: {text[:40]!r}")
    return int(text)
