"""The version of the code a pipeline step runs: a digest of its script and of every ``ifcl`` module the script
imports, directly or through other ``ifcl`` modules (found by reading the sources, nothing is imported).

Each rule passes this digest as a parameter, so Snakemake re-runs a step when the code it runs changed (Snakemake
itself only compares a script's modification time, and never looks at the library a script imports). A step does
not re-run for a change to a module it does not import, nor merely because files were restored or copied with new
timestamps.

The digest is over the parsed code, not the file bytes (:func:`code_text`): comments, docstrings, blank lines,
line breaks and the spacing inside a line change nothing; any change to what the code does (a name, a constant,
a statement) changes the digest. The text it hashes leaves out empty fields of the syntax tree, so that the
fields a newer Python adds to its tree (empty for existing code) do not change it either.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "ifcl"


def _module_file(src: Path, module: str) -> Path | None:
    """The source file of a dotted module name under ``src`` (a package's __init__.py), or None."""
    base = src.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(src: Path, path: Path) -> str | None:
    """The dotted name of a file under ``src`` (None for a script outside it)."""
    try:
        parts = list(path.relative_to(src).with_suffix("").parts)
    except ValueError:
        return None
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(src: Path | None, path: Path) -> str:
    """The package relative imports of a file resolve against ("" for a script outside ``src``)."""
    name = _module_name(src, path) if src is not None else None
    return (name if path.name == "__init__.py" else name.rpartition(".")[0]) if name else ""


def imported_names(path: str | Path, src: str | Path) -> frozenset[str]:
    """Every module name an import statement anywhere in the file could load (``from a import b`` gives a and a.b:
    b may be a submodule); relative imports are resolved against the file's package."""
    path = Path(path)
    return _analysed(path.read_bytes(), str(path), _package(Path(src), path))[0]


@lru_cache(maxsize=None)
def _analysed(source: bytes, filename: str, package: str = "") -> tuple[frozenset[str], str]:
    """The import names and the code text (:func:`code_text`) of one source, from one parse, cached by content:
    every rule's digest reads the same modules, and each is parsed once per process instead of once per rule."""
    tree = ast.parse(source, filename=filename)
    return _imports(tree, package), _dump(_without_docstrings(tree))


def _imports(tree: ast.AST, package: str) -> frozenset[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(names)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """The tree with the docstring of every module, class and function removed (``pass`` if nothing is left)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _dump(node) -> str:
    """A canonical text of a syntax (sub)tree: node type and non-empty fields, no positions."""
    if isinstance(node, ast.AST):
        fields = [f"{name}={_dump(value)}" for name, value in ast.iter_fields(node) if value is not None and value != []]
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_dump(v) for v in node) + "]"
    return repr(node)


def code_text(path: str | Path, src: str | Path | None = None) -> str:
    """What the digest of a Python file is computed from: its syntax tree without docstrings, as text."""
    path = Path(path)
    return _analysed(path.read_bytes(), str(path), _package(Path(src) if src is not None else None, path))[1]


def modules_used(script: str | Path, src: str | Path, roots: tuple[tuple[str, str], ...] = ()) -> list[Path]:
    """The files of the ``ifcl`` modules ``script`` imports, transitively, with the packages that contain them;
    ``roots``: further (package, folder holding it) pairs whose modules are followed too (a method's own package)."""
    bases = {PACKAGE: Path(src), **{package: Path(root) for package, root in roots}}
    seen: dict[Path, Path] = {}
    todo = [Path(script)]
    while todo:
        path = todo.pop()
        for name in imported_names(path, seen.get(path, Path(src))):
            parts = name.split(".")
            base = bases.get(parts[0])
            if base is None:
                continue
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
                found = _module_file(base, ".".join(parts[:depth]))
                if found is not None and found not in seen:
                    seen[found] = base
                    todo.append(found)
    return sorted(seen)


@lru_cache(maxsize=None)
def code_version(script: str | Path, src: str | Path, roots: tuple[tuple[str, str], ...] = ()) -> str:
    """sha256 over the script and the modules it uses (their paths relative to their package's folder and their
    code); ``roots`` as for :func:`modules_used`."""
    src = Path(src)
    bases = [src] + [Path(root) for _, root in roots]
    script = Path(script)
    home = next((b for b in bases if script.is_relative_to(b)), src)
    h = hashlib.sha256(code_text(script, home).encode())
    for path in modules_used(script, src, roots):
        base = next(b for b in bases if path.is_relative_to(b))
        h.update(b"\0" + path.relative_to(base).as_posix().encode() + b"\0" + code_text(path, base).encode())
    return h.hexdigest()
