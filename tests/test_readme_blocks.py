"""Every code block of README.md runs as written.

The blocks are extracted from README.md and run in a fresh directory, each
by the runner its first matching key names (a block that no key matches
fails the test: a new block needs a runner).  Commands that run until
stopped (``qlog worker``) are started, checked to consume, and stopped with
SIGTERM, which must end them with status 0.  The quick start and the
development commands are what ``.ci/run`` itself runs (tests/test_project.py
holds them to it); the benchmark commands take minutes, so each is checked
to start (``--help``), not run to the end.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
from typing import Callable, Dict, List, Tuple

import pytest

import qlog
from _crashkit import child_env
from conftest import _wait_until as wait_until
from conftest import free_port, pg_url

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def blocks() -> List[Tuple[int, str, str]]:
    """(line number, language, text) of every fenced block of README.md."""
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", README.read_text(), re.S | re.M):
        out.append((README.read_text()[: m.start()].count("\n") + 1, m.group(1), m.group(2)))
    return out


def env() -> Dict[str, str]:
    e = child_env()
    e["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), e.get("PATH", "")])
    return e


def run(argv: List[str] | str, cwd: pathlib.Path, timeout: float = 120, input: str | None = None,
        shell: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout,
                       input=input, shell=shell, executable="/bin/bash" if shell else None)
    assert r.returncode == 0, f"{argv!r} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def code_lines(text: str) -> List[str]:
    """The commands of a bash block, one per line (comments dropped, `\\` joined)."""
    joined = text.replace("\\\n", " ")
    return [ln.split(" #")[0].strip() for ln in joined.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def serve_until(cmd: str, cwd: pathlib.Path, done: Callable[[], bool], what: str) -> None:
    """Start ``cmd``, wait for ``done()``, stop it with SIGTERM: it must exit 0."""
    p = subprocess.Popen(shlex.split(cmd), cwd=cwd, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: done() or p.poll() is not None, timeout=60, what=what)
        assert p.poll() is None, f"{cmd!r} exited early:\n{p.communicate()[0]}"
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=60)[0]
        assert p.returncode == 0, f"{cmd!r} exited {p.returncode} on SIGTERM:\n{out}"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def acked(data: pathlib.Path, queue: str) -> int:
    with qlog.open(data) as b:
        return b.queue(queue).stats().acked


# -- runners ---------------------------------------------------------------------


def python_block(text: str, tmp: pathlib.Path) -> str:
    name = text.splitlines()[0][2:].split(":")[0].strip() if text.startswith("# ") else "block.py"
    (tmp / name).write_text(text)
    return run([sys.executable, name], tmp).stdout


def app_block(text: str, tmp: pathlib.Path) -> None:
    python_block(text, tmp)  # defines the consumer; runs nothing else


def worker_block(text: str, tmp: pathlib.Path) -> None:
    app = next(t for _, lang, t in blocks() if lang == "python" and t.startswith("# app.py"))
    (tmp / "app.py").write_text(app)
    for n, cmd in enumerate(code_lines(text), 1):
        with qlog.open(tmp / "data") as b:
            b.queue("my-job-queue").send({"userId": n})
        serve_until(cmd, tmp, lambda n=n: acked(tmp / "data", "my-job-queue") == n, f"{cmd!r} consumes")


def producer_block(text: str, tmp: pathlib.Path) -> None:
    python_block(text, tmp)
    with qlog.open(tmp / "data") as b:
        assert b.queue("my-job-queue").stats().backlog == 2


def signup_block(text: str, tmp: pathlib.Path) -> None:
    shutil.copytree(ROOT / "examples" / "signup", tmp / "signup",
                    ignore=shutil.ignore_patterns("signup-data", "__pycache__"))
    script = text.replace("cd examples/signup", f"cd {shlex.quote(str(tmp / 'signup'))}")
    p = subprocess.Popen(["/bin/bash", "-e", "-c", script], cwd=tmp, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the app and worker, had the block not stopped them
        except ProcessLookupError:
            pass
    assert p.returncode == 0, f"the walkthrough failed:\n{out}\n{err}"
    sent = [json.loads(obj) for obj in re.findall(r'\{[^{}]*"to"[^{}]*\}', out)]  # curl's answer ends in no newline
    assert [m["to"] for m in sent] == ["ada@example.com"], out


def queues_block(text: str, tmp: pathlib.Path) -> None:
    out = python_block(text, tmp)
    assert out.strip().endswith("['jobs']"), out


def toml_block(text: str, tmp: pathlib.Path) -> None:
    (tmp / "data").mkdir()
    (tmp / "data" / "qlog.toml").write_text(text)
    with qlog.open(tmp / "data") as b:
        s = b.queue("my-job-queue").settings
        assert (s.retry_delay, s.max_concurrency, s.dead_letter_queue) == (30, 4, "my-dlq")
        assert b.durability == "sync"


def lease_block(text: str, tmp: pathlib.Path) -> None:
    assert python_block(text, tmp).split() == ["1", "0", "[]"]


def manage_block(text: str, tmp: pathlib.Path) -> None:
    out = python_block(text, tmp)
    assert "reports" in out


def cli_block(text: str, tmp: pathlib.Path) -> None:
    app = next(t for _, lang, t in blocks() if lang == "python" and t.startswith("# app.py"))
    (tmp / "app.py").write_text(app)
    with qlog.open(tmp / "data") as b:  # a message in the DLQ, as after a failure
        b.queue("my-job-queue", max_retries=0, dead_letter_queue="my-dlq").send({"userId": 0})
        b.queue("my-job-queue").pull().retry_all()
        assert b.queue("my-dlq").stats().backlog == 1
    for cmd in code_lines(text):
        if cmd.startswith("qlog worker"):
            before = acked(tmp / "data", "my-job-queue")
            with qlog.open(tmp / "data") as b:
                b.queue("my-job-queue").send({"userId": 1})
            serve_until(cmd, tmp, lambda: acked(tmp / "data", "my-job-queue") > before, f"{cmd!r} consumes")
        elif "--watch" in cmd:  # until Ctrl-C: one answer, then SIGINT must end it with 0
            p = subprocess.Popen(shlex.split(cmd), cwd=tmp, env=env(), stdout=subprocess.PIPE, text=True)
            try:
                assert "BACKLOG" in p.stdout.readline() and "my-" in p.stdout.readline()
                p.send_signal(signal.SIGINT)
                assert p.wait(60) == 0
            finally:
                if p.poll() is None:
                    p.kill()
        else:
            run(cmd, tmp, shell=True, input="y\n" if cmd.startswith("qlog purge") else None)


def manage_cli_block(text: str, tmp: pathlib.Path) -> None:
    qlog.open(tmp / "data").close()
    for cmd in code_lines(text):
        run(cmd, tmp, shell=True)
    with qlog.open(tmp / "data") as b:
        assert "my-job-queue" not in b.queues()


PG_EXAMPLE = "postgresql://app@db.internal/app"  # the README's database; a fresh schema of the test server here


def pg_python_block(text: str, tmp: pathlib.Path) -> None:
    url = pg_url()
    python_block(text.replace(f'"{PG_EXAMPLE}"', repr(url)), tmp)
    with qlog.open(url) as b:
        st = b.queue("jobs").stats()
        assert (st.sent, st.acked, st.backlog) == (1, 1, 0)


def pg_cli_block(text: str, tmp: pathlib.Path) -> None:
    url = pg_url()
    (tmp / "app.py").write_text(
        f"import qlog\nbroker = qlog.open({url!r})\n\n"
        "@broker.consumer('jobs', max_batch_timeout=0.05)\ndef handle(batch):\n    pass\n")
    for cmd in code_lines(text):
        cmd = cmd.replace(PG_EXAMPLE, url)
        if cmd.startswith("pip install"):
            extra = re.search(r"\[(\w+)\]", cmd).group(1)
            assert extra in re.search(r"\[project.optional-dependencies\](.*?)\n\[", (ROOT / "pyproject.toml").read_text(),
                                      re.S).group(1)
            import psycopg  # noqa: F401  (installed by the test extra too)
        elif cmd.startswith("qlog worker"):
            with qlog.open(url) as b:
                b.queue("jobs").send_batch([1, 2, 3])
                serve_until(cmd, tmp, lambda: b.queue("jobs").stats().acked == 3, f"{cmd!r} consumes")
        else:
            out = run(cmd, tmp, shell=True).stdout
            if cmd.startswith("qlog stats"):
                assert "jobs" in out


def _serve_in(tmp: pathlib.Path, cmd: str) -> Tuple[subprocess.Popen, int]:
    """Start the README's ``qlog serve`` line in ``tmp`` on a free port."""
    port = free_port()
    argv = shlex.split(cmd.replace("--port 8787", f"--port {port}"))
    p = subprocess.Popen(argv, cwd=tmp, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    import httpx

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).status_code == 401
        except httpx.HTTPError:
            return p.poll() is not None
    wait_until(answers, timeout=60, what=f"{cmd!r} answers")
    assert p.poll() is None, p.stderr.read() if p.stderr else ""
    return p, port


def _stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0
    if p.stderr:
        p.stderr.close()


def serve_cli_block(text: str, tmp: pathlib.Path) -> None:
    import httpx

    for cmd in code_lines(text):
        if cmd.startswith("pip install"):
            extra = re.search(r"\[(\w+)\]", cmd).group(1)
            assert f"\n{extra} = " in (ROOT / "pyproject.toml").read_text()
        elif cmd.startswith("qlog serve"):
            p, port = _serve_in(tmp, cmd)
            try:
                token = (tmp / "token").read_text().strip()
                r = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"authorization": f"Bearer {token}"})
                assert r.status_code == 200
            finally:
                _stop(p)
        else:
            run(cmd, tmp, shell=True)


def serve_python_block(text: str, tmp: pathlib.Path) -> None:
    serve = next(t for _, _, t in blocks() if "qlog serve ./data --port 8787" in t)
    lines = code_lines(serve)
    run(next(c for c in lines if c.startswith("head ")), tmp, shell=True)
    p, port = _serve_in(tmp, next(c for c in lines if c.startswith("qlog serve")))
    try:
        out = python_block(text.replace("127.0.0.1:8787", f"127.0.0.1:{port}"), tmp)
        assert out.strip() == "1 message(s) pulled and acked", out
    finally:
        _stop(p)
    with qlog.open(tmp / "data") as b:
        assert b.queue("jobs").stats().acked == 1


def engine_block(text: str, tmp: pathlib.Path) -> None:
    out = python_block(text, tmp)
    assert out.startswith("0 b'a'\n1 b'b'\n2 b'c'\n"), out


def bench_block(text: str, tmp: pathlib.Path) -> None:
    for cmd in code_lines(text):
        argv = shlex.split(cmd)
        if argv[0] == "python":
            run([sys.executable, str(ROOT / argv[1]), "--help"], ROOT)
        else:
            assert argv[:2] == ["pytest", "benchmarks/"], cmd
            run([sys.executable, "-m", "pytest", "--collect-only", "-q", "benchmarks/"], ROOT)


def ci_commands(text: str, tmp: pathlib.Path) -> None:
    """The quick start and the development commands: .ci/run runs the
    install and the suite, then .ci/sanitize; the rest name files that exist."""
    ci = (ROOT / ".ci" / "run").read_text()
    for cmd in code_lines(text):
        if "pytest" in cmd and "benchmark" not in cmd:
            assert "pytest" in ci
        for word in shlex.split(cmd):
            if "/" in word and not word.startswith(("'", "-")) and "[" not in word:
                assert (ROOT / word).exists(), f"{cmd!r} names {word}, which does not exist"


RUNNERS: List[Tuple[str, Callable[[str, pathlib.Path], None]]] = [
    ("# pg.py", pg_python_block),
    ("qlog serve ./data --port 8787", serve_cli_block),
    ("# cf_client.py", serve_python_block),
    ("qlog migrate postgresql://", pg_cli_block),
    ("pip install . && python examples/quickstart.py", ci_commands),
    ("# app.py", app_block),
    ("qlog worker app:broker                  #", worker_block),
    ("# producer.py", producer_block),
    ("cd examples/signup", signup_block),
    ('q = broker.queue("jobs", max_retries=3, dead_letter_queue="jobs-dlq")', queues_block),
    ("[[queues.consumers]]", toml_block),
    ("q.extend(ids", lease_block),
    ("broker.create_queue(", manage_block),
    ("qlog send ./data", cli_block),
    ("qlog queues create", manage_cli_block),
    ("qlog.Log(", engine_block),
    ("python benchmarks/queues.py", bench_block),
    ("pip install -e", ci_commands),
]


def runner_for(text: str) -> Callable[[str, pathlib.Path], None]:
    for key, fn in RUNNERS:
        if key in text:
            return fn
    raise AssertionError(f"README block has no runner in tests/test_readme_blocks.py:\n{text}")


@pytest.mark.parametrize("line, lang, text", blocks(), ids=[f"line{n}" for n, _, _ in blocks()])
def test_readme_block_runs_as_written(line: int, lang: str, text: str, tmp_path: pathlib.Path) -> None:
    runner_for(text)(text, tmp_path)


def test_every_runner_matches_a_block() -> None:
    texts = [t for _, _, t in blocks()]
    unused = [key for key, _ in RUNNERS if not any(key in t for t in texts)]
    assert not unused, f"runners for blocks no longer in README.md: {unused}"


def test_readme_limits_table_states_the_limits_the_code_enforces() -> None:
    from qlog import _settings

    text = README.read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| ([^|]+?) \| ([^|]+?) \|", text, re.M)}
    assert rows["messages per `send_batch`"] == f"{_settings.MAX_SEND_BATCH:,}"
    assert rows["bytes per `send_batch`"] == f"{_settings.MAX_SEND_BATCH_BYTES >> 20} MiB (bodies)"
    assert rows["messages per `pull`"] == f"{_settings.MAX_PULL_BATCH:,}"
    assert rows["body size"].startswith(f"{qlog.QueueSettings.max_message_size:,} bytes by default")
    assert rows["`pull()` with no `batch_size`"].endswith(f"(default {qlog.QueueSettings.max_batch_size})")
    assert _settings.RANGES["max_message_size"][2] == 16 << 20 and "up to 16 MiB" in rows["body size"]
