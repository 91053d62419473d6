"""The import graph points one way: the faces call down, never the other way.

Drawn from the source with `ast` (nothing is imported, so a module's import
side effects cannot hide an arrow), over every import statement, including
those inside functions and under TYPE_CHECKING: a lazy import up a layer is
still an arrow up. `python tests/test_layers.py` prints the graph by layer.

Layers, top down (see /work/shared/STYLE.md, "The shape to grow into"):

- face: the gRPC service and server, the API views, the stream fan-out, the
  CLI, the dashboard, the demo and the participants' test stack;
- engine: the engine, the transition writer, the machine, completion tokens,
  the change signal;
- store: compensa.orchestrator.store and everything under it;
- below them the shared modules (records, errors, timestamps, retry, ...).

A lower layer that has to tell a higher one something offers a subscription
(orchestrator.changes.ChangeSignal), it does not import it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The source roots whose `compensa/` trees hold our code (generated/ aside).
PACKAGES = ("orchestrator", "participants")

FACE = (
    "compensa.orchestrator.service",
    "compensa.orchestrator.views",
    # Saved histories checked: a replay compared with the API's view of the saga.
    "compensa.orchestrator.history_checks",
    "compensa.orchestrator.streams",
    "compensa.orchestrator.server",
    "compensa.orchestrator.cli",
    "compensa.orchestrator.dashboard",
    "compensa.orchestrator.demo",
    # Starts a whole orchestrator beside a user's participants for their
    # tests: a composition root, like the demo, so it sits on top.
    "compensa.testing",
)
ENGINE = (
    "compensa.orchestrator.engine",
    "compensa.orchestrator.writer",
    "compensa.orchestrator.machine",
    "compensa.orchestrator.records",
    "compensa.orchestrator.tokens",
    "compensa.orchestrator.changes",
)
STORE = ("compensa.orchestrator.store",)
#: The participant SDK and what both sides share stand apart from the
#: orchestrator; the examples use only the SDK (and the shared modules).
ORCHESTRATOR = ("compensa.orchestrator", "compensa.testing")
SDK = ("compensa.participants",)
COMMON = ("compensa.common",)
EXAMPLES = ("compensa.examples",)

Graph = dict[str, set[str]]


def _in(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> source file, for every module under the source
    roots `packages` of `root` (named from the root down: compensa.x.y)."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package / "compensa").rglob("*.py")):
            parts = list(path.relative_to(root / package).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported(module: str, is_package: bool, tree: ast.AST, known: Mapping[str, Path]) -> set[str]:
    """The modules of `known` that `tree` imports; `from a import b` names
    a.b when that is a module, else a."""
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]
        else:
            continue
        for name in names:
            # `import a.b.c` of a module we know, or the nearest package of it we know.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> Graph:
    """module -> the project modules it imports."""
    files = module_files(root, packages)
    return {
        module: _imported(module, path.name == "__init__.py", ast.parse(path.read_text(), str(path)), files)
        for module, path in files.items()
    }


def upward_arrows(graph: Graph) -> list[str]:
    """Every arrow that points the wrong way: from below the face into it,
    from the store into the engine, from the participant SDK or the shared
    modules into the orchestrator, from the shared modules into the SDK, and
    from the SDK into the examples."""
    arrows: list[str] = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if not _in(source, FACE) and _in(target, FACE):
                arrows.append(f"{source} -> {target} (into the face)")
            elif _in(source, STORE) and _in(target, ENGINE) and target != "compensa.orchestrator.records":
                arrows.append(f"{source} -> {target} (store into the engine)")
            elif _in(source, SDK + COMMON + EXAMPLES) and _in(target, ORCHESTRATOR):
                arrows.append(f"{source} -> {target} (participant side into the orchestrator)")
            elif _in(source, COMMON) and _in(target, SDK + EXAMPLES):
                arrows.append(f"{source} -> {target} (shared into the participant side)")
            elif _in(source, SDK) and _in(target, EXAMPLES):
                arrows.append(f"{source} -> {target} (SDK into the examples)")
    return arrows


def cycles(graph: Graph) -> list[list[str]]:
    """Import cycles between modules (a package and its own submodules aside:
    `__init__` re-exporting its parts is not a cycle of layers)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target.startswith(module + ".") or module.startswith(target + "."):
                continue
            if state.get(target) == 1:
                found.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_nothing_below_the_face_imports_it_and_the_store_does_not_import_the_engine() -> None:
    graph = import_graph()
    assert {
        "compensa.orchestrator.engine", "compensa.orchestrator.store.sql", "compensa.participants.sdk"
    } <= set(graph)
    arrows = upward_arrows(graph)
    assert not arrows, "imports that point up a layer:\n" + "\n".join(arrows)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_the_check_sees_an_upward_arrow_wherever_it_is_written(tmp_path: Path) -> None:
    """The scanner itself: an arrow up hidden in a function, a relative import
    or `from package import module` is found, and a cycle is reported."""
    package = tmp_path / "orchestrator" / "compensa" / "orchestrator"
    (package / "store").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "views.py").write_text("def timestamp(): ...\n")
    (package / "engine.py").write_text("def run():\n    from compensa.orchestrator.views import timestamp\n")
    (package / "store" / "__init__.py").write_text("")
    (package / "store" / "sql.py").write_text("from .. import machine\nfrom compensa.orchestrator import records\n")
    (package / "machine.py").write_text("import compensa.orchestrator.records\n")
    (package / "records.py").write_text("from compensa.orchestrator import machine\n")
    sdk = tmp_path / "participants" / "compensa" / "participants"
    sdk.mkdir(parents=True)
    (sdk / "__init__.py").write_text("")
    (sdk / "sdk.py").write_text("from compensa.orchestrator.records import FINAL_SAGA_STATES\n")
    graph = import_graph(tmp_path, ["orchestrator", "participants"])
    assert graph["compensa.orchestrator.store.sql"] == {
        "compensa.orchestrator.machine", "compensa.orchestrator.records",
    }
    assert upward_arrows(graph) == [
        "compensa.orchestrator.engine -> compensa.orchestrator.views (into the face)",
        "compensa.orchestrator.store.sql -> compensa.orchestrator.machine (store into the engine)",
        "compensa.participants.sdk -> compensa.orchestrator.records (participant side into the orchestrator)",
    ]
    assert cycles(graph) == [
        ["compensa.orchestrator.machine", "compensa.orchestrator.records", "compensa.orchestrator.machine"]
    ]


def _layer(module: str) -> str:
    if _in(module, FACE):
        return "face"
    if _in(module, ENGINE):
        return "engine"
    if _in(module, STORE):
        return "store"
    return "shared" if _in(module, ORCHESTRATOR + COMMON) else "participants"


def main() -> None:
    graph = import_graph()
    for layer in ("face", "engine", "store", "shared", "participants"):
        print(f"[{layer}]")
        for module in sorted(module for module in graph if _layer(module) == layer):
            targets = ", ".join(sorted(graph[module])) or "-"
            print(f"  {module} -> {targets}")
    for arrow in upward_arrows(graph):
        print(f"UP: {arrow}")
    for cycle in cycles(graph):
        print("CYCLE: " + " -> ".join(cycle))


if __name__ == "__main__":
    sys.exit(main())

