"""The library's import graph: no circles in ifcl.data, so a step's code digest covers only what it runs (the task
split, for instance, covers the manifest format and not the generated-data or MTIL readers)."""
import ast

from conftest import REPO
from ifcl.codeversion import imported_names

SRC = REPO / "src"


def module_name(path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """ifcl module -> the ifcl modules it imports anywhere in its file (functions included), resolved as the code
    digests resolve them (ifcl.codeversion.imported_names)."""
    modules = {module_name(p): p for p in (SRC / "ifcl").rglob("*.py")}
    return {name: {m for m in imported_names(path, SRC) if m in modules and m != name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]], within: str) -> list[list[str]]:
    """Every import circle among the modules whose names start with ``within`` (one per strongly connected set)."""
    nodes = {n for n in graph if n.startswith(within)}
    found, seen = [], set()
    for start in sorted(nodes):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node] & nodes):
                if nxt == start:
                    key = frozenset(path)
                    if key not in seen:
                        seen.add(key)
                        found.append(path + [start])
                elif nxt not in path and nxt > start:
                    stack.append((nxt, path + [nxt]))
    return found


def test_cycle_finder_finds_a_circle():
    assert cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": set()}, "p.") == [["p.a", "p.b", "p.c", "p.a"]]


def test_the_data_package_has_no_import_circles():
    graph = import_graph()
    assert "ifcl.data.manifest" in graph and graph["ifcl.data.prepare"] >= {"ifcl.data.mtil", "ifcl.data.generated"}
    assert cycles(graph, "ifcl.data") == []
    # the dispatcher by dataset type is imported by no per-type module
    assert not [m for m, deps in graph.items() if "ifcl.data.prepare" in deps]


def lazy_imports(within: str) -> list[str]:
    """``module:line`` of every import of an ifcl module inside a function of the modules named ``within...``."""
    found = []
    for path in sorted((SRC / "ifcl").rglob("*.py")):
        name = module_name(path)
        if not name.startswith(within):
            continue
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "ifcl"):
                    found.append(f"{name}:{node.lineno}")
                elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ifcl" for a in node.names):
                    found.append(f"{name}:{node.lineno}")
    return found


def test_the_data_package_imports_its_modules_at_the_top():
    """No function of ifcl.data imports an ifcl module (a lazy import is how a circle hides)."""
    assert lazy_imports("ifcl.data") == []
