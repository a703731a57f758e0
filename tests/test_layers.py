"""The layering rule of docs/architecture.md, checked on every import statement of the package (lazy imports
inside functions included): a package may import only the ones its layer lists."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scale_refiner"

# unit -> the units it may import (besides itself). A unit is a top-level module or a subpackage.
FOUNDATION = {"atomic", "precision", "partition"}
ALLOWED = {
    "atomic": set(),
    "precision": set(),
    "partition": set(),
    "hostsync": {"precision"},  # the CPU detector of host synchronisations (tests/test_hostsync.py): it wraps
    # precision's host copies
    "models": {"atomic", "precision", "partition"},
    "config": {"models"},
    "data": {"atomic", "config"},
    "heads": {"precision"},
    "memory": {"precision"},
    "objective": {"precision"},
    "engine": FOUNDATION | {"config", "models"},
    "refiner": FOUNDATION | {"config", "models", "heads", "memory", "objective", "engine"},
    "mae": FOUNDATION | {"config", "models", "engine"},
    "eval": FOUNDATION | {"config", "models", "data", "engine"},
    "bench": FOUNDATION | {"config", "models", "data", "heads", "memory", "objective", "engine", "refiner", "mae",
                           "eval"},
}
ALLOWED["plan"] = ALLOWED["bench"] | {"bench"}  # the planner: meta-built models, FLOPs, CPU measurements
ALLOWED["cli"] = set(ALLOWED) - {"cli"}  # the commands: wiring, anything below


def unit_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_units(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "scale_refiner" and len(parts) > 1:
                yield parts[1], node.lineno


def test_every_import_follows_the_layers():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        if unit == "__init__":
            continue
        assert unit in ALLOWED, f"{path}: a new unit; give it a layer in docs/architecture.md and here"
        for target, line in imported_units(path):
            if target != unit and target not in ALLOWED[unit]:
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} imports {target}")
    assert not broken, "\n".join(broken)


def test_the_rule_has_no_cycles():
    seen, done = set(), set()

    def visit(unit, trail):
        assert unit not in seen or unit in done, f"cycle: {' -> '.join(trail + [unit])}"
        if unit in done:
            return
        seen.add(unit)
        for target in ALLOWED[unit]:
            visit(target, trail + [unit])
        done.add(unit)

    for unit in ALLOWED:
        visit(unit, [])


def test_no_caller_probes_an_engine():
    """Every method a caller uses is on the engine's base class (engine/base.py), with a default where an engine
    has nothing to do: no getattr / hasattr on an engine outside the engines themselves."""
    probes = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "engine" and path.name in ("base.py", "single.py", "fsdp.py", "zero.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr") and node.args):
                target = ast.unparse(node.args[0])
                if "engine" in target.split(".")[-1]:
                    probes.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not probes, "\n".join(probes)


def _module_imports():
    """module -> the package modules it imports (lazy imports included), by dotted name."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets.update(c for c in candidates if c in modules and c != name)
        graph[name] = targets - {n for n in targets if name.startswith(n + ".") or n.endswith("__init__")}
    return graph


def test_no_import_circle():
    """No two modules import each other, directly or through others (lazy imports inside functions included: a
    lazy import that breaks a circle hides a design knot, not a necessity)."""
    graph = _module_imports()
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)
