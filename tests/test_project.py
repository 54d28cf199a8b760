"""The project's promises about itself: the quick start, CI and the public surface."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import qlog

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md must start with a bash block of commands"
    return [line.split("#")[0].strip() for line in block.group(1).strip().splitlines()]


def test_readme_starts_with_an_install_and_run_command_and_a_test_command() -> None:
    cmds = _quick_start_commands()
    assert len(cmds) == 2
    assert cmds[0].startswith("pip install .") and "python" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """The README's test command is a line of .ci/run, verbatim (further
    steps, such as the sanitizer build, may follow it)."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert _quick_start_commands()[1] in commands


def test_public_surface_is_exactly_all() -> None:
    public = {name for name in dir(qlog) if not name.startswith("_")}
    modules = {"errors"}
    assert public - modules == set(qlog.__all__)
    for name in qlog.__all__:
        assert getattr(qlog, name) is not None


# Private names the layers on top may touch, each on something not qlog's.
_FOREIGN_PRIVATE = {"_exit": "os._exit", "_putter": "persist-queue's connection, in a baseline"}


def _private_reach_ins(path: pathlib.Path) -> list[str]:
    """Accesses ``x._name`` in ``path`` where ``x`` is not ``self``/``cls``
    and ``_name`` is not an attribute the file's own classes set."""
    tree = ast.parse(path.read_text())
    own = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
           and isinstance(n.value, ast.Name) and n.value.id == "self"}
    own |= {e.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and t.id == "__slots__"
            for e in ast.walk(n.value) if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    found = []
    for n in ast.walk(tree):
        if (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))
                and n.attr not in own and n.attr not in _FOREIGN_PRIVATE):
            found.append(f"{path.relative_to(ROOT)}:{n.lineno}: {ast.unparse(n)}")
    return found


def test_consumers_cli_and_benchmarks_use_only_public_methods() -> None:
    """The layers on top of the semantics layer (push consumers, the CLI)
    and the benchmarks reach no private field of qlog's objects."""
    files = [ROOT / "qlog" / "_consumer.py", *sorted((ROOT / "qlog" / "_cli").glob("*.py")),
             *sorted((ROOT / "benchmarks").glob("*.py"))]
    found = [hit for f in files for hit in _private_reach_ins(f)]
    assert not found, "private fields reached into:\n" + "\n".join(found)
    assert _private_reach_ins(ROOT / "tests" / "test_consumer.py"), "the check finds nothing at all"


def test_every_error_is_a_qlog_error() -> None:
    for name in qlog.errors.__all__:
        assert issubclass(getattr(qlog.errors, name), qlog.QlogError)


def test_mypy_strict_finds_no_errors() -> None:
    """``mypy --strict`` passes on the package (configured in pyproject.toml's
    [tool.mypy]; mypy comes with the test extra)."""
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "qlog"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, f"mypy --strict qlog failed:\n{run.stdout}{run.stderr}"


def test_settings_keyword_arguments_are_typed_so_a_misspelt_key_is_caught(tmp_path: pathlib.Path) -> None:
    """``broker.queue(..., max_retires=1)`` is a type error, not a silent
    ``**settings: Any`` (and a runtime SettingsError)."""
    app = tmp_path / "app.py"
    app.write_text(
        "import qlog\n"
        "broker = qlog.open('./data')\n"
        "broker.queue('jobs', max_retries=1, delivery_delay=2.5, durability='none')\n"
        "broker.queue('jobs', max_retires=1)\n"
        "broker.configure('jobs', max_batch_size='10')\n"
        "broker.configure('jobs', durability='none')\n"
        "broker.consumer('jobs', max_concurency=2)\n"
    )
    run = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", str(app)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    errors = [ln for ln in run.stdout.splitlines() if ": error:" in ln]
    lines = sorted(int(ln.split(":")[1]) for ln in errors)
    assert lines == [4, 5, 6, 7], run.stdout
    assert "max_retires" in run.stdout and "max_concurency" in run.stdout


def test_typed_settings_name_every_setting() -> None:
    from qlog import _settings

    assert set(_settings.Settings.__annotations__) == _settings.KEYS
    assert set(_settings.StoredSettings.__annotations__) == _settings.KEYS - _settings.HANDLE_KEYS


def test_help_qlog_opens_with_an_example_that_runs(tmp_path: pathlib.Path) -> None:
    doc = qlog.__doc__ or ""
    assert doc.index("import qlog") < 400, "help(qlog) opens with the example"
    lines = doc.split("::\n", 1)[1].split("\n\n``qlog.open")[0].splitlines()
    code = "\n".join(ln[4:] for ln in lines)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    mid, attempts, body = run.stdout.split(" ", 2)
    assert len(mid) == 32 and attempts == "1" and body.strip() == "{'userId': 42}"
    with qlog.open(tmp_path / "data") as b:
        assert b.queue("jobs").stats().acked == 1


def test_public_docstrings_and_signatures_read_as_a_user_sees_them() -> None:
    import inspect

    assert "mode: 'int' = 0o600" in str(inspect.signature(qlog.open))
    assert "= 0o600" in str(inspect.signature(qlog.Log))
    for attr in ("id", "timestamp", "content_type", "attempts", "body", "lease_id", "visible_at"):
        assert getattr(qlog.Message, attr).__doc__, f"Message.{attr} has no docstring"
    assert qlog.Log.stats.__doc__ and qlog.Log.first_seq.__doc__
    for cls in (qlog.Message, qlog.MessageBatch, qlog.Queue, qlog.Broker, qlog.Log):
        private = re.findall(r"``(_[a-z]\w*)``", cls.__doc__ or "")
        assert not private, f"{cls.__name__}'s docstring names private fields {private}"


def test_log_creates_its_missing_parent_directories_as_open_does(tmp_path: pathlib.Path) -> None:
    with qlog.Log(tmp_path / "data" / "raw") as log:
        log.append(b"x")
    assert (tmp_path / "data" / "raw").is_dir()
