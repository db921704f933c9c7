"""The shape of the house, checked: hubproxy's import graph has no cycle (``TYPE_CHECKING``
imports included: a cycle hidden behind one is still a cycle), and the pure decision modules
(``hubproxy/policy/``) import no I/O, no clock and no configuration, and nothing outside their
folder, so not through another hubproxy module either."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hubproxy"

# the face: flags, the config file, assembly
FACE = frozenset({"__main__", "app", "cli", "config", "configfile", "settings"})
# what a pure module may not import: I/O, threads, the clock, the file system
FORBIDDEN = frozenset(
    {
        "asyncio",
        "os",
        "pathlib",
        "select",
        "selectors",
        "shutil",
        "socket",
        "ssl",
        "subprocess",
        "tempfile",
        "threading",
        "time",
        "trio",
    }
)


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(part for part in relative.parts if part != "__init__") or "__init__"


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(hubproxy modules, other top-level packages) that ``name`` imports anywhere in it."""
    ours: set[str] = set()
    foreign: set[str] = set()
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    known = modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hubproxy."):
                    ours.add(alias.name.removeprefix("hubproxy."))
                else:
                    foreign.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
                if module == "hubproxy" or module.startswith("hubproxy."):
                    base = module.removeprefix("hubproxy").lstrip(".")
                else:
                    foreign.add(module.split(".")[0])
                    continue
            else:
                anchor = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join([*anchor, node.module] if node.module else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                if candidate in known:
                    ours.add(candidate)  # "from . import flow": the module itself
                elif base:
                    ours.add(base)
    ours.discard("__init__")
    return {m for m in ours if m in known}, foreign


def graph() -> dict[str, set[str]]:
    return {name: imports(name, path)[0] for name, path in modules().items()}


def pure() -> list[str]:
    """The decisions over plain values, which a reader tests without sockets (STYLE 1): every
    module of ``hubproxy/policy/``."""
    return sorted(name for name in modules() if name.startswith("policy."))


def test_the_folders_and_the_face_are_where_this_test_looks() -> None:
    known = modules()
    assert len(pure()) >= 15
    assert {"policy.flow", "policy.tokenpolicy", "policy.cachepolicy"} <= set(pure())
    assert FACE - {"__main__"} <= known.keys()


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", pure())
def test_pure_modules_import_no_io_clock_or_configuration(name: str) -> None:
    ours, foreign = imports(name, modules()[name])
    assert not foreign & FORBIDDEN, f"{name} imports {sorted(foreign & FORBIDDEN)}"
    assert not ours & FACE, f"{name} imports the face: {sorted(ours & FACE)}"
    impure = ours - set(pure()) - {"policy"}
    assert not impure, f"{name} imports modules outside policy/: {sorted(impure)}"


def test_the_checker_sees_a_cycle_and_a_forbidden_import(tmp_path: Path) -> None:
    """The checks above can fail: a module importing trio and one importing itself through a
    relative import are both seen."""
    fake = tmp_path / "hubproxy"
    fake.mkdir()
    (fake / "a.py").write_text("import trio\nfrom . import b\n")
    (fake / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n"
    )
    global PACKAGE
    saved = PACKAGE
    PACKAGE = fake
    try:
        assert imports("a", fake / "a.py") == ({"b"}, {"trio"})
        assert imports("b", fake / "b.py")[0] == {"a"}
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_the_import_graph_has_no_cycle()
    finally:
        PACKAGE = saved


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("net.")))
def test_connections_know_nothing_above_them(name: str) -> None:
    """``net/`` carries bytes for whoever asks: it may use the pure policies (errors, headers)
    but never the configuration, the cache, the operator's side or the middle."""
    ours, _foreign = imports(name, modules()[name])
    above = {m for m in ours if not m.startswith(("net.", "policy."))}
    assert not above, f"{name} imports {sorted(above)}"
