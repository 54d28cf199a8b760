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
