"""The version of the code a pipeline step runs: a digest of its script and of every ``ifcl`` module the script
imports, directly or through other ``ifcl`` modules (found by reading the sources, nothing is imported).

Each rule passes this digest as a parameter, so Snakemake re-runs a step when the code it runs changed (Snakemake
itself only compares a script's modification time, and never looks at the library a script imports). A step does
not re-run for a change to a module it does not import, nor merely because files were restored or copied with new
timestamps. The digest is over file bytes: a comment edit counts as a change.
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


def _imported_names(path: Path, name: str | None) -> frozenset[str]:
    """Every module name an import statement anywhere in the file could load (``from a import b`` gives a and a.b:
    b may be a submodule); relative imports are resolved against the file's package."""
    package = (name if path.name == "__init__.py" else name.rpartition(".")[0]) if name else ""
    return _names_in(path.read_bytes(), package, str(path))


@lru_cache(maxsize=None)
def _names_in(source: bytes, package: str, filename: str) -> frozenset[str]:
    """The import names of one source text, cached by content: every rule's digest reads the same modules, and
    parsing them once each instead of once per rule halves the time Snakemake takes to start."""
    names = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
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


def modules_used(script: str | Path, src: str | Path) -> list[Path]:
    """The files of the ``ifcl`` modules ``script`` imports, transitively, with the packages that contain them."""
    src = Path(src)
    seen: dict[Path, None] = {}
    todo = [Path(script)]
    while todo:
        path = todo.pop()
        for name in _imported_names(path, _module_name(src, path)):
            if name.split(".")[0] != PACKAGE:
                continue
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
                found = _module_file(src, ".".join(parts[:depth]))
                if found is not None and found not in seen:
                    seen[found] = None
                    todo.append(found)
    return sorted(seen)


@lru_cache(maxsize=None)
def code_version(script: str | Path, src: str | Path) -> str:
    """sha256 over the script and the modules it uses (their paths relative to ``src`` and their bytes)."""
    src = Path(src)
    h = hashlib.sha256(Path(script).read_bytes())
    for path in modules_used(script, src):
        h.update(b"\0" + path.relative_to(src).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()
