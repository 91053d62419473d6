"""The import graph points one way, and the folders show the layers.

Drawn from the source with `ast` (nothing is imported, so a module's import
side effects cannot hide an arrow), over every import statement, including
those inside functions and under TYPE_CHECKING: a lazy import up a layer is
still an arrow up. `python tests/test_layers.py` prints the graph by layer.

Layers of compensa.orchestrator, top down, one folder each (see
/work/shared/STYLE.md, "The shape to grow into"):

- composition roots: the process (`server`, its `config`), the CLI (with the
  demo) and `compensa.testing`: they assemble the rest, and only they may
  import the participant SDK and the examples;
- face: the gRPC API (`api/`), the dashboard (`dashboard/`) and the client
  library (`client`);
- engine: `engine/`;
- store: `store/`;
- shared: `shared/` and `definitions/`, the vocabulary every layer uses.

Every module of compensa.orchestrator belongs to exactly one of them (a new
module in an unlisted place fails the test). Beside the orchestrator stand the
participant SDK (`compensa.participants`), the examples built on it, and
`compensa.common`, what both sides share; neither of those imports the
orchestrator. A lower layer that has to tell a higher one something offers a
subscription (engine.changes.ChangeSignal), it does not import it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The source roots whose `compensa/` trees hold our code (generated/ aside).
PACKAGES = ("orchestrator", "participants")

_O = "compensa.orchestrator"
#: Each layer of the orchestrator, top down, as the modules and folders it holds.
LAYERS: dict[str, tuple[str, ...]] = {
    "composition": (f"{_O}.server", f"{_O}.config", f"{_O}.cli", "compensa.testing"),
    "face": (f"{_O}.api", f"{_O}.dashboard", f"{_O}.client"),
    "engine": (f"{_O}.engine",),
    "store": (f"{_O}.store",),
    "shared": (f"{_O}.shared", f"{_O}.definitions", _O),
}
ORDER = tuple(LAYERS)
ORCHESTRATOR = (_O, "compensa.testing")
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


def layer_of(module: str) -> str:
    """The layer of a module of the orchestrator (the longest prefix wins:
    `compensa.orchestrator` itself is shared, its folders are not), or
    "participants" for the SDK, the examples and compensa.common."""
    best, layer = -1, "participants"
    for name, prefixes in LAYERS.items():
        for prefix in prefixes:
            if _in(module, (prefix,)) and len(prefix) > best:
                best, layer = len(prefix), name
    return layer


def upward_arrows(graph: Graph) -> list[str]:
    """Every arrow that points the wrong way: from a layer of the orchestrator
    into one above it, from anywhere but a composition root into the SDK or
    the examples, from the participant side or the shared modules into the
    orchestrator, from the shared modules into the participant side, and from
    the SDK into the examples."""
    arrows: list[str] = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _in(source, ORCHESTRATOR) and _in(target, ORCHESTRATOR):
                above = ORDER.index(layer_of(target)) < ORDER.index(layer_of(source))
                if above:
                    arrows.append(f"{source} -> {target} ({layer_of(source)} into the {layer_of(target)})")
            elif _in(source, ORCHESTRATOR) and _in(target, SDK + EXAMPLES):
                if layer_of(source) != "composition":
                    arrows.append(f"{source} -> {target} (orchestrator outside its composition roots into the SDK)")
            elif _in(source, SDK + COMMON + EXAMPLES) and _in(target, ORCHESTRATOR):
                arrows.append(f"{source} -> {target} (participant side into the orchestrator)")
            elif _in(source, COMMON) and _in(target, SDK + EXAMPLES):
                arrows.append(f"{source} -> {target} (shared into the participant side)")
            elif _in(source, SDK) and _in(target, EXAMPLES):
                arrows.append(f"{source} -> {target} (SDK into the examples)")
    return arrows


def unplaced(graph: Graph) -> list[str]:
    """Modules of the orchestrator in no folder of a layer: only the listed
    top-level modules may sit beside the folders."""
    top_level = {prefix for prefixes in LAYERS.values() for prefix in prefixes}
    return sorted(
        module for module in graph
        if module.startswith(_O + ".") and not any(_in(module, (prefix,)) for prefix in top_level - {_O})
    )


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


def test_nothing_imports_a_layer_above_it() -> None:
    graph = import_graph()
    assert {
        "compensa.orchestrator.engine.engine", "compensa.orchestrator.store.sql", "compensa.participants.sdk"
    } <= set(graph)
    arrows = upward_arrows(graph)
    assert not arrows, "imports that point up a layer:\n" + "\n".join(arrows)


def test_every_module_of_the_orchestrator_sits_in_a_layer() -> None:
    stray = unplaced(import_graph())
    assert not stray, "modules in no layer's folder (move them, or list them in LAYERS):\n" + "\n".join(stray)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_the_check_sees_an_upward_arrow_wherever_it_is_written(tmp_path: Path) -> None:
    """The scanner itself: an arrow up hidden in a function, a relative import
    or `from package import module` is found, a module outside the layers'
    folders is reported, and a cycle is reported."""
    package = tmp_path / "orchestrator" / "compensa" / "orchestrator"
    for folder in ("api", "engine", "store", "shared"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "api" / "views.py").write_text("def timestamp(): ...\n")
    (package / "engine" / "engine.py").write_text(
        "def run():\n    from compensa.orchestrator.api.views import timestamp\n"
    )
    (package / "engine" / "tracing.py").write_text("from compensa.participants import sdk\n")
    (package / "store" / "sql.py").write_text(
        "from ..engine import machine\nfrom compensa.orchestrator.shared import records\n"
    )
    (package / "engine" / "machine.py").write_text("import compensa.orchestrator.shared.records\n")
    (package / "shared" / "records.py").write_text("from compensa.orchestrator.engine import machine\n")
    (package / "stray.py").write_text("")
    sdk = tmp_path / "participants" / "compensa" / "participants"
    sdk.mkdir(parents=True)
    (sdk / "__init__.py").write_text("")
    (sdk / "sdk.py").write_text("from compensa.orchestrator.shared.records import FINAL_SAGA_STATES\n")
    graph = import_graph(tmp_path, ["orchestrator", "participants"])
    assert graph["compensa.orchestrator.store.sql"] == {
        "compensa.orchestrator.engine.machine", "compensa.orchestrator.shared.records",
    }
    assert upward_arrows(graph) == [
        "compensa.orchestrator.engine.engine -> compensa.orchestrator.api.views (engine into the face)",
        "compensa.orchestrator.engine.tracing -> compensa.participants.sdk"
        " (orchestrator outside its composition roots into the SDK)",
        "compensa.orchestrator.shared.records -> compensa.orchestrator.engine.machine (shared into the engine)",
        "compensa.orchestrator.store.sql -> compensa.orchestrator.engine.machine (store into the engine)",
        "compensa.participants.sdk -> compensa.orchestrator.shared.records (participant side into the orchestrator)",
    ]
    assert unplaced(graph) == ["compensa.orchestrator.stray"]
    machine, records = "compensa.orchestrator.engine.machine", "compensa.orchestrator.shared.records"
    assert cycles(graph) == [[machine, records, machine]]


def main() -> None:
    graph = import_graph()
    for layer in (*ORDER, "participants"):
        print(f"[{layer}]")
        for module in sorted(module for module in graph if layer_of(module) == layer):
            targets = ", ".join(sorted(graph[module])) or "-"
            print(f"  {module} -> {targets}")
    for arrow in upward_arrows(graph):
        print(f"UP: {arrow}")
    for module in unplaced(graph):
        print(f"UNPLACED: {module}")
    for cycle in cycles(graph):
        print("CYCLE: " + " -> ".join(cycle))


if __name__ == "__main__":
    sys.exit(main())
