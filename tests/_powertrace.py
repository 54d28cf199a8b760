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
directory maps from the root down (a rename or a new name is there only
after the directory's fsync), each file with its durable image (empty if
never synced), plus what the page cache may have written back of the
pages dirtied since (its unsynced tail).  A real disk after a power cut,
and so this model (``random_writeback``), may hold for each of those pages:

- nothing of it (the durable bytes, zeros past them);
- all of it, in any subset of the file's dirty pages: write-back follows no
  file order, so a later page can be there while an earlier one is not;
- an earlier version of it: a page written back at one look and dirtied
  again before the next sync (every version the trace saw since the sync);
- part of it: a prefix of its 512-byte sectors over what the disk held (a
  torn page; a sector is written whole or not at all).

This holds for every file alike: message segments, state journal segments,
checkpoints and their temporary files.  ``choose`` places the pages
deliberately instead (``out_of_order_writeback``: a later dirty page kept,
an earlier one lost).  Only pages written before the cut are ever used: a
cut never shows a later write.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import stat
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

PAGE = 4096
SECTOR = 512     # what a disk writes whole or not at all

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
        self._held: Optional[str] = None    # logs under this path: background syncs wait
        self._hold = threading.Condition()
        self._hold_timeout = 120.0
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

    def look(self) -> None:
        """Note the pages written since the last look now (a moment at which
        a cut shows what the page cache holds), as any sync call does."""
        with self.lock:
            self._look()

    def mark(self, fact: Any) -> None:
        """Put a workload marker into the trace, in order."""
        with self.lock:
            self.events.append(("M", fact))

    @contextlib.contextmanager
    def background_syncs_held(self, under: str, timeout: float = 120.0) -> Iterator[None]:
        """While in the block, an fsync or fdatasync that an "interval" log's
        flusher thread (``qlog-flush:<log path>``) makes of a log below
        ``under`` (relative to the root) waits for the block to end, as a
        sync still running on a busy disk: the records written meanwhile
        stay unsynced, so that one trace holds several of them in a file's
        unsynced tail at once whatever the threads' timing.  Only flusher
        threads wait (the caller's own syncs, a roll's seal, go through)."""
        with self._hold:
            assert self._held is None, "background syncs are already held"
            self._held = os.path.join(self.root, under)
            self._hold_timeout = timeout
        try:
            yield
        finally:
            with self._hold:
                self._held = None
                self._hold.notify_all()

    def _wait_if_held(self) -> None:
        name = threading.current_thread().name
        if not name.startswith("qlog-flush:"):
            return
        path = os.path.realpath(name[len("qlog-flush:"):])
        with self._hold:
            deadline = time.monotonic() + self._hold_timeout
            while self._held is not None and (path + os.sep).startswith(self._held + os.sep):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"background syncs of {path} were held for over "
                                         f"{self._hold_timeout} s")
                self._hold.wait(left)

    # -- hooks ------------------------------------------------------------------

    def engine_hooks(self) -> Dict[str, Callable]:
        """Syscall-table hooks for ``_simvfs.syscalls``."""
        from _simvfs import real

        def fdatasync(fd: int) -> int:
            self._wait_if_held()
            r = real.fdatasync(fd)
            if r == 0:
                self.synced(fd)
            return r

        def fsync(fd: int) -> int:
            self._wait_if_held()
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

        def link(a, b) -> int:
            r = real.link(a, b)
            self.changed()
            return r

        def open_(path, flags, mode) -> int:
            fd = real.open(path, flags, mode)
            if flags & os.O_CREAT:
                self.changed()
            return fd

        return {"fdatasync": fdatasync, "fsync": fsync, "rename": rename, "unlink": unlink,
                "link": link, "open": open_}

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

SECTORS = PAGE // SECTOR

# What a cut leaves of one dirty page: (version, sectors).  ``version`` indexes
# the page's versions since the file's durable image (oldest first; -1: the
# last one); ``sectors`` of them are written over what the disk held (SECTORS
# or more: the whole page; fewer: a torn page).
Fate = Tuple[int, int]
# choose(relpath, dirty page offsets in file order, {offset: versions}) ->
# {offset: Fate} for the pages written back (the others stay as the durable
# image holds them), or None to leave the file to the random model.
Chooser = Callable[[str, List[int], Dict[int, List[bytes]]], Optional[Dict[int, Fate]]]


class FileCut(NamedTuple):
    """What a cut left of one file's dirty pages (offsets, in file order)."""

    dirty: Tuple[int, ...]
    whole: Tuple[int, ...]          # holding their last version, whole
    older: Tuple[int, ...]          # holding an earlier version (whole or torn)
    torn: Tuple[int, ...]           # holding a prefix of their sectors

    @property
    def reached(self) -> Tuple[int, ...]:
        """Pages holding something written after the durable image."""
        return tuple(sorted(set(self.whole) | set(self.older) | set(self.torn)))

    @property
    def out_of_order(self) -> bool:
        """A later page reached the disk (in part or whole) while an earlier
        one did not wholly hold its last version: a hole no in-order
        write-back can leave."""
        missing = [p for p in self.dirty if p not in self.whole]
        return bool(missing) and any(p > missing[0] for p in self.reached)


def random_writeback(rng: random.Random, written: float = 0.5, older: float = 0.25,
                     torn: float = 0.125) -> Chooser:
    """The model of the module docstring: each dirty page is written back
    with probability ``written``, independently of the others (any subset);
    a page written back holds an earlier version than its last with
    probability ``older`` (when it had one), and only a random prefix of its
    sectors with probability ``torn``."""

    def choose(rel: str, dirty: List[int], versions: Dict[int, List[bytes]]) -> Dict[int, Fate]:
        out: Dict[int, Fate] = {}
        for p in dirty:
            if rng.random() >= written:
                continue
            vs = versions[p]
            v = rng.randrange(len(vs) - 1) if len(vs) > 1 and rng.random() < older else len(vs) - 1
            n = -(-len(vs[v]) // SECTOR)
            k = rng.randint(1, n - 1) if n > 1 and rng.random() < torn else SECTORS
            out[p] = (v, k)
        return out

    return choose


def out_of_order_writeback(rng: random.Random, tear_first: bool = False) -> Chooser:
    """A deliberately out-of-order cut of a file with two or more dirty
    pages: the last one is written back whole, the first one is not
    (``tear_first``: only a prefix of its sectors is), and each page between
    them is written back or not at random.  Returns None for a file with
    fewer dirty pages."""

    def choose(rel: str, dirty: List[int], versions: Dict[int, List[bytes]]) -> Optional[Dict[int, Fate]]:
        if len(dirty) < 2:
            return None
        out: Dict[int, Fate] = {dirty[-1]: (-1, SECTORS)}
        if tear_first:
            n = -(-len(versions[dirty[0]][-1]) // SECTOR)
            if n > 1:
                out[dirty[0]] = (-1, rng.randint(1, n - 1))
        for p in dirty[1:-1]:
            if rng.random() < 0.5:
                out[p] = (-1, SECTORS)
        return out

    return choose


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
        # identity -> page offset -> the page's versions since the durable image
        self.versions: Dict[int, Dict[int, List[bytes]]] = {}
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
                vers = self.versions.setdefault(ident, {})
                for off, chunk in pages.items():
                    buf[off:off + len(chunk)] = chunk
                    vers.setdefault(off, []).append(chunk)
                self.path[ident] = rel
            elif kind == "S":
                data = bytes(self.live.get(ev[1], b""))
                self.durable[ev[1]] = data
                self.versions.pop(ev[1], None)
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

    def dirty(self, ident: int) -> Tuple[List[int], Dict[int, List[bytes]]]:
        """The file's dirty pages now: the offsets (in file order) of the
        pages whose live bytes differ from its durable image, and for each
        its versions since that image (oldest first, the live one last;
        none equal to the durable bytes)."""
        cur = self.live.get(ident)
        if cur is None:
            return [], {}
        old = self.durable.get(ident, b"")
        seen = self.versions.get(ident, {})
        offs: List[int] = []
        out: Dict[int, List[bytes]] = {}
        for p in range(0, len(cur), PAGE):
            last = bytes(cur[p:p + PAGE])
            was = old[p:p + len(last)]
            was += bytes(len(last) - len(was))   # past the durable bytes the disk reads zeros
            if last == was:
                continue
            vs: List[bytes] = []
            for v in seen.get(p, ()):
                v = v[:len(last)]
                if v != was and v != last and v not in vs:
                    vs.append(v)
            vs.append(last)
            offs.append(p)
            out[p] = vs
        return offs, out

    def materialise(self, out: str, tear: Optional[random.Random] = None,
                    choose: Optional[Chooser] = None,
                    extra_names: Optional[Dict[str, int]] = None) -> Dict[str, FileCut]:
        """Write the tree a cut now leaves into ``out`` (new).

        Each durably named file holds its durable image; with ``tear``, its
        dirty pages fare as ``random_writeback`` says; ``choose`` decides
        instead for the files it does not return None for.  ``extra_names``
        (relpath -> identity): files named in the tree although no directory
        fsync made the name durable (as another process's fsync of their
        directory would have).  Returns ``{relpath: FileCut}`` for every
        file with dirty pages."""
        os.makedirs(out)
        model = random_writeback(tear) if tear is not None else None
        cuts: Dict[str, FileCut] = {}
        files: List[Tuple[str, int]] = []
        stack = [""]
        while stack:
            rel = stack.pop()
            for name, (kind, ident) in sorted(self.dirs.get(rel, {}).items()):
                sub = f"{rel}/{name}" if rel else name
                if kind == "d":
                    os.mkdir(os.path.join(out, sub))
                    stack.append(sub)
                else:
                    files.append((sub, ident))
        files += sorted((extra_names or {}).items())
        for sub, ident in files:
            content = bytearray(self.durable.get(ident, b""))
            dirty, versions = self.dirty(ident)
            if dirty:
                fates = choose(sub, dirty, versions) if choose is not None else None
                if fates is None and model is not None:
                    fates = model(sub, dirty, versions)
                whole, older, torn = [], [], []
                for p, (v, k) in sorted((fates or {}).items()):
                    vs = versions[p]
                    v = v % len(vs)
                    chunk = vs[v]
                    n = min(len(chunk), k * SECTOR)
                    if p + n > len(content):
                        content.extend(bytes(p + n - len(content)))
                    content[p:p + n] = chunk[:n]
                    if v != len(vs) - 1:
                        older.append(p)
                    if n < len(chunk):
                        torn.append(p)
                    elif v == len(vs) - 1:
                        whole.append(p)
                cuts[sub] = FileCut(tuple(dirty), tuple(whole), tuple(older), tuple(torn))
            with open(os.path.join(out, sub), "wb") as f:
                f.write(content)
        return cuts
