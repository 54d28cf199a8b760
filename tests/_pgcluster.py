"""A throwaway PostgreSQL cluster: initdb in a temporary directory, a free
loopback port, started and stopped with pg_ctl (as the ``postgres`` user
when run as root, since PostgreSQL refuses to run as root).

Used by the tests (``conftest.py``'s ``postgresql`` backend, the fault
tests) and by ``benchmarks/postgres.py``.  Needs Debian's ``postgresql``
package (``.ci/run`` installs it); a missing server is an error, not a skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import List, Optional


def _bindir() -> str:
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(os.path.realpath(found))
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    for d in reversed(dirs):
        if os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    raise RuntimeError("PostgreSQL's server programs (initdb, pg_ctl) are not installed: "
                       "apt-get install postgresql (.ci/run does)")


def free_port() -> int:
    """A port free on loopback now (the tests' servers bind it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One PostgreSQL server of its own (``url`` reaches it as superuser)."""

    def __init__(self, settings: Optional[List[str]] = None) -> None:
        self.bindir = _bindir()
        self.user: Optional[str] = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
            self.user = "postgres"
        self.root = tempfile.mkdtemp(prefix="qlog-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._settings = ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=500",
                          "-c", f"unix_socket_directories={self.root}", "-p", str(self.port)]
        self._settings += settings or []
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        self.start()

    def _run(self, prog: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bindir, prog), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120,
                              cwd=self.root)

    def start(self) -> None:
        try:
            self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60",
                      "-o", " ".join(self._settings), "start")
        except subprocess.CalledProcessError as e:
            tail = open(self.log).read()[-2000:] if os.path.exists(self.log) else ""
            raise RuntimeError(f"PostgreSQL did not start: {e.stderr}\n{tail}") from None

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (a clean shutdown) or ``immediate`` (a
        crash: no checkpoint, recovery from the WAL at the next start)."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
