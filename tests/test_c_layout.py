"""The C engine's files depend on each other one way only: for every
non-static function, the file defining it against the files calling it."""
import pathlib
import re

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"

_NOISE = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', re.S)
_DEF = re.compile(r"^(?!static\b)(?!#)[A-Za-z_][\w \t*]*?\b(\w+)\s*\([^;{]*\)\s*\{", re.M)


def _sources():
    return {p.name: _NOISE.sub(" ", p.read_text()) for p in sorted(CSRC.glob("*.c"))}


def _graph(sources):
    definer = {}
    for name, text in sources.items():
        for m in _DEF.finditer(text):
            definer.setdefault(m.group(1), name)
    edges = {name: set() for name in sources}
    for name, text in sources.items():
        for fn, where in definer.items():
            if where != name and re.search(r"\b%s\b" % fn, text):
                edges[name].add(where)
    return definer, edges


def _cycle(edges):
    """One dependency circle as a list of files, or None."""
    state = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_parser_sees_the_shared_helpers():
    definer, edges = _graph(_sources())
    # The parse finds real definitions: if it found none, the check below
    # would pass for nothing.
    assert definer["log_fail"] == "segment.c"
    assert definer["qlog_open"] == "open.c"
    assert "segment.c" in edges["append.c"] and "segment.c" in edges["read.c"]


def test_no_circular_dependency_between_c_files():
    _, edges = _graph(_sources())
    assert _cycle(edges) is None, "C files depend on each other in a circle: %s" % " -> ".join(_cycle(edges))


def test_cycle_check_catches_a_circle():
    fake = {
        "a.c": "int fa(void) { return fb(); }\n",
        "b.c": "static int helper(void) { return 0; }\nint fb(void) { return fa() + helper(); }\n",
    }
    _, edges = _graph(fake)
    assert _cycle(edges) == ["a.c", "b.c", "a.c"]
