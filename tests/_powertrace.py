"""A power-cut trace of a whole directory tree, and the disks it can leave.

``_simvfs.Recorder`` keeps one durable image per file and is read after one
SIGKILL.  This module keeps the whole history instead, so that one run of a
workload gives many power cuts: every prefix of the trace is a moment the
power may go.

The recording side (``TraceRecorder``, in the process under test) sees every
call that can make something durable, whether the engine makes it through
its syscall table or Python code makes it through ``os``:

- ``fdatasync``/``fsync`` of a file: the file's bytes at that moment become
  its durable image;
- ``fsync`` of a directory: its name -> file map becomes durable (files
  created, renamed or unlinked after it are not there after a cut);
- ``rename``/``unlink``/``link``/``open(O_CREAT)``: nothing becomes durable,
  but the recorder looks at the tree again so that a reused inode number is
  never taken for the file that had it before.

At each of these calls it also notes every page that changed in every file
since it last looked ("written": in the page cache, maybe on disk, maybe
not).  Markers (``mark``) put what the workload did into the same trace, in
order, so that a cut's prefix says both what the disk holds and what the
workload had been told.

Files are named by an identity (a new one whenever an inode number turns up
after the file that had it was unlinked), directories by their path.

The replaying side (``Replay``) walks a trace forward; ``materialise``
writes the directory a cut at the current position leaves: the durable
directory maps from the root down, each file with its durable image (empty
if never synced), optionally plus a random subset of the pages written
after it (a torn tail: the kernel may have written them back).  Only pages
written before the cut are ever used: a cut never shows a later write.
"""

from __future__ import annotations

import os
import pickle
import stat
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import random

PAGE = 4096

# Trace events (tuples, pickled):
#   ("W", ident, relpath, size, {offset: page bytes})   pages written since last look
#   ("S", ident)                                         the file's live bytes are durable
#   ("D", reldir, {name: ("f", ident) | ("d", None)})    a directory's map is durable
#   ("M", fact)                                          a workload marker
#   ("X", ident)                                         the file is gone (unlinked)


class TraceRecorder:
    """Records the power-cut history of the tree at ``root`` (see the module
    docstring).  Everything in it when it starts is durable.  Thread-safe."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.events: List[tuple] = []
        self.lock = threading.RLock()
        self._ino: Dict[int, int] = {}      # live inode number -> identity
        self._live: Dict[int, bytes] = {}   # identity -> bytes when last looked
        self._next = 0
        self.looks = 0
        with self.lock:
            names = self._look()
            for rel, entries in names.items():
                for _, (kind, ident) in entries.items():
                    if kind == "f":
                        self.events.append(("S", ident))
                self.events.append(("D", rel, entries))

    # -- looking at the tree ------------------------------------------------

    def _look(self) -> Dict[str, Dict[str, Tuple[str, Optional[int]]]]:
        """Note the pages changed since the last look; forget inodes that are
        gone.  Returns each directory's live map."""
        self.looks += 1
        seen = set()
        dirs: Dict[str, Dict[str, Tuple[str, Optional[int]]]] = {}
        stack = [""]
        while stack:
            rel = stack.pop()
            entries: Dict[str, Tuple[str, Optional[int]]] = {}
            try:
                it = list(os.scandir(os.path.join(self.root, rel)))
            except FileNotFoundError:
                continue
            for e in it:
                sub = f"{rel}/{e.name}" if rel else e.name
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    entries[e.name] = ("d", None)
                    stack.append(sub)
                elif stat.S_ISREG(st.st_mode):
                    ident = self._ino.get(st.st_ino)
                    if ident is None:
                        ident = self._ino[st.st_ino] = self._next
                        self._next += 1
                    seen.add(st.st_ino)
                    entries[e.name] = ("f", ident)
                    self._note(ident, sub, e.path)
            dirs[rel] = entries
        for ino in [i for i in self._ino if i not in seen]:
            self.events.append(("X", self._ino.pop(ino)))
        return dirs

    def _note(self, ident: int, rel: str, path: str) -> None:
        try:
            with open(path, "rb") as f:
                cur = f.read()
        except FileNotFoundError:
            return
        old = self._live.get(ident, b"")
        if cur == old:
            return
        pages = {}
        for p in range(0, len(cur), PAGE):
            chunk = cur[p:p + PAGE]
            if chunk != old[p:p + PAGE]:
                pages[p] = chunk
        self.events.append(("W", ident, rel, len(cur), pages))
        self._live[ident] = cur

    def _rel(self, path: str) -> Optional[str]:
        p = os.path.realpath(path)
        if p == self.root:
            return ""
        if p.startswith(self.root + os.sep):
            return p[len(self.root) + 1:]
        return None

    # -- what the calls make durable ---------------------------------------------

    def synced(self, fd: int) -> None:
        """After a successful fsync/fdatasync of ``fd``."""
        st = os.fstat(fd)
        with self.lock:
            dirs = self._look()
            if stat.S_ISDIR(st.st_mode):
                rel = self._rel(os.readlink(f"/proc/self/fd/{fd}"))
                if rel is not None and rel in dirs:
                    self.events.append(("D", rel, dirs[rel]))
            else:
                ident = self._ino.get(st.st_ino)
                if ident is not None:
                    self.events.append(("S", ident))

    def changed(self) -> None:
        """After a call that changed a directory (rename, unlink, link, create)."""
        with self.lock:
            self._look()

    def mark(self, fact: Any) -> None:
        """Put a workload marker into the trace, in order."""
        with self.lock:
            self.events.append(("M", fact))

    # -- hooks ------------------------------------------------------------------

    def engine_hooks(self) -> Dict[str, Callable]:
        """Syscall-table hooks for ``_simvfs.syscalls``."""
        from _simvfs import real

        def fdatasync(fd: int) -> int:
            r = real.fdatasync(fd)
            if r == 0:
                self.synced(fd)
            return r

        def fsync(fd: int) -> int:
            r = real.fsync(fd)
            if r == 0:
                self.synced(fd)
            return r

        def rename(a, b) -> int:
            r = real.rename(a, b)
            self.changed()
            return r

        def unlink(p) -> int:
            r = real.unlink(p)
            self.changed()
            return r

        return {"fdatasync": fdatasync, "fsync": fsync, "rename": rename, "unlink": unlink}

    def os_proxy(self) -> "OsProxy":
        return OsProxy(self)

    def dump(self, path: str) -> None:
        with self.lock:
            with open(path, "wb") as f:
                pickle.dump(self.events, f, protocol=pickle.HIGHEST_PROTOCOL)


class OsProxy:
    """Stands for the ``os`` module inside a module of the package (install
    with ``module.os = proxy``): every call is the real one; the calls that
    make something durable or change a directory are also recorded."""

    def __init__(self, rec: TraceRecorder) -> None:
        self._rec = rec

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        self._rec.synced(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)
        self._rec.synced(fd)

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
        if flags & os.O_CREAT:
            self._rec.changed()
        return fd

    def _then_look(self, fn: Callable, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        finally:
            self._rec.changed()

    def rename(self, a, b, **kw):
        return self._then_look(os.rename, a, b, **kw)

    def replace(self, a, b, **kw):
        return self._then_look(os.replace, a, b, **kw)

    def link(self, a, b, **kw):
        return self._then_look(os.link, a, b, **kw)

    def unlink(self, p, **kw):
        return self._then_look(os.unlink, p, **kw)

    def remove(self, p, **kw):
        return self._then_look(os.remove, p, **kw)


def load(path: str) -> List[tuple]:
    with open(path, "rb") as f:
        return pickle.load(f)


# ---- the replaying side ---------------------------------------------------------


class Replay:
    """Walks a trace forward (``advance``); ``materialise`` writes what a
    power cut at the current position leaves."""

    def __init__(self, events: List[tuple],
                 on_durable: Optional[Callable[[str, bytes, int, "Replay"], None]] = None) -> None:
        """``on_durable(relpath, image, identity, replay)`` is called at each
        file image that becomes durable, as the replay passes it."""
        self.events = events
        self.pos = 0
        self.live: Dict[int, bytearray] = {}
        self.path: Dict[int, str] = {}          # identity -> its relpath when last written
        self.durable: Dict[int, bytes] = {}
        self.dirs: Dict[str, Dict[str, Tuple[str, Optional[int]]]] = {}
        self.on_durable = on_durable

    def advance(self, upto: int, on_mark: Optional[Callable[[Any], None]] = None) -> None:
        """Apply events up to (not including) position ``upto``."""
        for i in range(self.pos, upto):
            ev = self.events[i]
            kind = ev[0]
            if kind == "W":
                _, ident, rel, size, pages = ev
                buf = self.live.get(ident)
                if buf is None:
                    buf = self.live[ident] = bytearray()
                if len(buf) < size:
                    buf.extend(bytes(size - len(buf)))
                else:
                    del buf[size:]
                for off, chunk in pages.items():
                    buf[off:off + len(chunk)] = chunk
                self.path[ident] = rel
            elif kind == "S":
                data = bytes(self.live.get(ev[1], b""))
                self.durable[ev[1]] = data
                if self.on_durable is not None:
                    self.on_durable(self.path.get(ev[1], ""), data, ev[1], self)
            elif kind == "D":
                self.dirs[ev[1]] = dict(ev[2])
            elif kind == "M" and on_mark is not None:
                on_mark(ev[1])
        self.pos = max(self.pos, upto)

    def durably_named(self, ident: int) -> bool:
        """Whether the file is reachable from the root through durable maps now."""
        rel = self.path.get(ident)
        if rel is None:
            return False
        parts = rel.split("/")
        cur = ""
        for i, name in enumerate(parts):
            entry = self.dirs.get(cur, {}).get(name)
            if entry is None:
                return False
            if i == len(parts) - 1:
                return entry == ("f", ident)
            if entry[0] != "d":
                return False
            cur = f"{cur}/{name}" if cur else name
        return False

    def materialise(self, out: str, tear: Optional[random.Random] = None) -> Dict[str, int]:
        """Write the tree a cut now leaves into ``out`` (new).  With ``tear``,
        each page written after a file's durable image is there too with
        probability 1/2.  Returns ``{relpath: torn pages}`` for torn files."""
        os.makedirs(out)
        torn: Dict[str, int] = {}
        stack = [""]
        while stack:
            rel = stack.pop()
            for name, (kind, ident) in sorted(self.dirs.get(rel, {}).items()):
                sub = f"{rel}/{name}" if rel else name
                dst = os.path.join(out, sub)
                if kind == "d":
                    os.mkdir(dst)
                    stack.append(sub)
                    continue
                content = bytearray(self.durable.get(ident, b""))
                cur = self.live.get(ident)
                if tear is not None and cur is not None and cur != content:
                    n = 0
                    for p in range(0, max(len(cur), len(content)), PAGE):
                        chunk = cur[p:p + PAGE]
                        if chunk and chunk != content[p:p + PAGE] and tear.random() < 0.5:
                            if p + len(chunk) > len(content):
                                content.extend(bytes(p + len(chunk) - len(content)))
                            content[p:p + len(chunk)] = chunk
                            n += 1
                    if n:
                        torn[sub] = n
                with open(dst, "wb") as f:
                    f.write(content)
        return torn
