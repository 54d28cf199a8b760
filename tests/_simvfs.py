"""The engine's syscall table (``qlog_vfs``) written in Python, the way
SQLite's test VFS works: fault injection, and a recorder of what a power
cut would leave on disk.

``syscalls(fdatasync=f, ...)`` installs a table whose named entries call
the given Python functions (the others stay the real system calls) and
restores the default table on exit, whatever happens.  A hook returns what
the POSIX call returns and sets ``ffi.errno`` on failure (``fallocate``
returns 0 or an errno value); ``real.<name>(...)`` is the real call.

The power-cut model (``Recorder`` in the child, ``materialise`` in the
parent):

- at ``fdatasync``/``fsync`` of a file, the file's bytes at that moment
  become its durable image (keyed by inode);
- at ``fsync`` of the directory, its name -> inode map becomes durable:
  files created, renamed or unlinked after the last directory fsync are
  not there after the cut;
- after the cut, each durably named file holds its durable image (empty if
  it was never synced), optionally plus a random subset of the pages
  written after that image (a torn tail: write-back follows no file order,
  so a later page may be there without an earlier one), some of them only
  in part (a prefix of their 512-byte sectors: a torn page).
The images are written to a shadow directory as they happen, so the child
can be SIGKILLed at any moment.

This module owns the engine's ``qlog_py_*`` callbacks: tests install Python
syscall tables only through ``syscalls``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import stat
import struct
import sys
import traceback
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import qlog
from qlog._log._qlog_c import ffi, lib

real = ffi.new("qlog_vfs *")
lib.qlog_vfs_get_default(real)

HOOKS = ("open", "close", "pread", "pwrite", "fdatasync", "fsync", "rename", "unlink",
         "ftruncate", "fallocate", "boot_id", "writeback", "fs_type", "link")
PAGE = 4096
SECTOR = 512     # what a disk writes whole or not at all

_handlers: Dict[str, Callable] = {}
_errors: List[BaseException] = []
_fatal = [False]


def _dispatcher(name: str) -> Callable:
    def hook(*args):
        try:
            handler = _handlers.get(name)
            if handler is None:     # not ours to change: the real call
                return getattr(real, name)(*args)
            return handler(*args)
        except BaseException as e:  # a broken hook must not pass for success
            if _fatal[0]:
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(70)
            _errors.append(e)
            if name == "fallocate":
                return errno.EIO
            ffi.errno = errno.EIO
            return -1
    return hook


def _register() -> None:
    for name in HOOKS:
        ffi.def_extern(name=f"qlog_py_{name}")(_dispatcher(name))


def restore_default() -> None:
    t = ffi.new("qlog_vfs *")
    lib.qlog_vfs_get_default(t)
    lib.qlog_vfs_set(t)


@contextlib.contextmanager
def syscalls(*, fatal: bool = False, **handlers: Callable) -> Iterator[None]:
    """Install the given Python hooks as the engine's syscall table.

    The default table is back when the block ends, even on error.  An
    exception in a hook makes the call fail with EIO and is raised again at
    the end of the block (``fatal``: ends the process at once, for children)."""
    unknown = set(handlers) - set(HOOKS)
    if unknown:
        raise ValueError(f"no such syscall hook: {sorted(unknown)}")
    _register()
    _handlers.clear()
    _handlers.update(handlers)
    _errors.clear()
    _fatal[0] = fatal
    t = ffi.new("qlog_vfs *")
    lib.qlog_vfs_get_default(t)
    for name in handlers:
        setattr(t, name, getattr(lib, f"qlog_py_{name}"))
    lib.qlog_vfs_set(t)
    try:
        yield
    finally:
        restore_default()
        _handlers.clear()
        errs = list(_errors)
        _errors.clear()
    if errs:
        raise errs[0]


def fd_path(fd: int) -> str:
    """The path an open descriptor of this process refers to."""
    return os.readlink(f"/proc/self/fd/{fd}")


def boot_id_hook(boot_id: str) -> Callable:
    """A ``boot_id`` hook that reports ``boot_id`` (a different one = a reboot)."""
    raw = boot_id.encode() + b"\0"

    def hook(out, n):
        b = raw[: n - 1] + b"\0"
        ffi.memmove(out, b, len(b))
        return 0
    return hook


def new_boot_id(rng: random.Random) -> str:
    h = "%032x" % rng.getrandbits(128)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ---- power cut: the recording side (runs in the child) ------------------------

_SIZE = struct.Struct("<Q")
DIR_MAP = "dir.json"


def _put(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)   # a kill mid-write leaves the previous image whole


class Recorder:
    """Syscall hooks that note, in ``shadow``, every durable image as the
    engine makes it durable.  Everything in ``log_dir`` when it starts is
    durable (the machine has just booted)."""

    def __init__(self, log_dir: str, shadow: str, boot_id: str) -> None:
        self.dir = os.path.realpath(log_dir)
        self.shadow = shadow
        self.boot_id = boot_id_hook(boot_id)
        os.makedirs(shadow, exist_ok=True)
        for e in os.scandir(self.dir):
            if e.is_file(follow_symlinks=False):
                fd = os.open(e.path, os.O_RDONLY)
                try:
                    self._image(fd)
                finally:
                    os.close(fd)
        self._dir_map()

    def hooks(self) -> Dict[str, Callable]:
        return {"fdatasync": self.fdatasync, "fsync": self.fsync, "boot_id": self.boot_id}

    def fdatasync(self, fd: int) -> int:
        r = real.fdatasync(fd)
        if r == 0:
            self._image(fd)
        return r

    def fsync(self, fd: int) -> int:
        r = real.fsync(fd)
        if r == 0:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                if os.path.realpath(fd_path(fd)) == self.dir:
                    self._dir_map()
            else:
                self._image(fd)
        return r

    def _image(self, fd: int) -> None:
        st = os.fstat(fd)
        data = os.pread(fd, st.st_size, 0) if st.st_size else b""
        _put(os.path.join(self.shadow, f"ino-{st.st_ino}"), _SIZE.pack(st.st_size) + data.rstrip(b"\0"))

    def _dir_map(self) -> None:
        names = {e.name: e.inode() for e in os.scandir(self.dir) if e.is_file(follow_symlinks=False)}
        _put(os.path.join(self.shadow, DIR_MAP), json.dumps(names).encode())


# ---- power cut: the materialising side (runs in the parent) -------------------


def _load_image(shadow: str, ino: int) -> bytearray:
    try:
        with open(os.path.join(shadow, f"ino-{ino}"), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return bytearray()   # never synced: its blocks never reached the disk
    (size,) = _SIZE.unpack_from(raw)
    data = bytearray(raw[_SIZE.size:])
    data.extend(bytes(size - len(data)))
    return data


def materialise(live_dir: str, shadow: str, out_dir: str,
                tear: Optional[random.Random] = None,
                choose: Optional[Callable[[str, List[int]], Iterable[int]]] = None,
                ) -> Dict[str, Tuple[int, int]]:
    """Write into ``out_dir`` (new) what the disk holds after a power cut.

    With ``tear``, each page by which a file's live bytes differ from its
    durable image is also there with probability 1/2 (the kernel may have
    written it back), one in eight of those only as a prefix of its 512-byte
    sectors over the durable bytes (a torn page), and a size cut after the
    image survives with probability 1/2.  ``choose(name, differing page
    offsets)`` picks the written-back pages instead (whole).  Returns
    ``{name: (size, pages written back)}``."""
    os.makedirs(out_dir)
    try:
        with open(os.path.join(shadow, DIR_MAP)) as f:
            names: Dict[str, int] = json.load(f)
    except FileNotFoundError:
        names = {}   # the directory was never synced: no name in it is durable
    live = {e.inode(): e.path for e in os.scandir(live_dir) if e.is_file(follow_symlinks=False)}
    out: Dict[str, Tuple[int, int]] = {}
    for name, ino in sorted(names.items()):
        content = _load_image(shadow, ino)
        torn = 0
        if (tear is not None or choose is not None) and ino in live:
            with open(live[ino], "rb") as f:
                cur = f.read()
            durable_size = len(content)
            differ = [p for p in range(0, max(len(cur), durable_size), PAGE)
                      if cur[p:p + PAGE] and cur[p:p + PAGE] != content[p:p + PAGE]]
            if choose is not None:
                written = set(choose(name, differ))
            else:
                written = {p for p in differ if tear.random() < 0.5}
            for p in sorted(written):
                chunk = cur[p:p + PAGE]
                sectors = -(-len(chunk) // SECTOR)
                if tear is not None and sectors > 1 and tear.random() < 0.125:
                    chunk = chunk[:tear.randint(1, sectors - 1) * SECTOR]
                if p + len(chunk) > len(content):
                    content.extend(bytes(p + len(chunk) - len(content)))
                content[p:p + len(chunk)] = chunk
                torn += 1
            if tear is not None and len(cur) < durable_size and tear.random() < 0.5:
                del content[len(cur):]
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(content)
        out[name] = (len(content), torn)
    return out


# ---- the power-cut child ----------------------------------------------------


def powercut_child(path: str, shadow: str, boot_id: str, child_id: int, seed: int,
                   segment_bytes: int, max_filler: int = 1500) -> None:
    """Append under durability "sync" (reported as ``seq n counter``: acknowledged),
    with some batches through a second handle in "none" (``S seq n counter``:
    handed out, not durable) and reads (``R seq``: the highest number read),
    while a Recorder notes what is durable.  Runs until killed."""
    from _crashkit import make_payload

    rng = random.Random(seed)
    rec = Recorder(path, shadow, boot_id)
    with syscalls(fatal=True, **rec.hooks()):
        slog = qlog.Log(path, durability="sync", segment_bytes=segment_bytes)
        nlog = qlog.Log(path, durability="none", segment_bytes=segment_bytes)
        os.write(1, b"open\n")
        n, high = 0, -1
        while True:
            base = (child_id << 32) | n
            op = rng.random()
            if op < 0.45:
                k, log, tag = 1, slog, b""
                seq = slog.append(make_payload(base, 1, 0, rng.randrange(max_filler)))
            else:
                # a batch: acknowledged through "sync", or only handed out through
                # "none" (bigger, so that unsynced data spans pages)
                log, tag, size = (slog, b"", max_filler) if op < 0.7 else (nlog, b"S ", 2 * max_filler)
                k = rng.randint(1, 8)
                seq = log.append_batch([make_payload(base + i, k, i, rng.randrange(size))
                                        for i in range(k)])
            os.write(1, b"%s%d %d %d\n" % (tag, seq, k, base))
            n += k
            if rng.random() < 0.3:
                got = slog.read(max(high, 0), max_records=100)
                if got:
                    high = got[-1][0]
                    os.write(1, b"R %d\n" % high)


def child_main() -> None:
    func, kwargs = sys.argv[1], json.loads(sys.argv[2])
    globals()[func](**kwargs)
