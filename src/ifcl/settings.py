"""Typed settings: a method's own experiment keys, declared once as a frozen dataclass.

A method's declaration (:class:`ifcl.registry.Method`) names a settings class whose fields are the keys its
experiments add to their protocol's (``experiments.<name>.<field>``); a field whose type is another settings class
is a nested mapping. Each field carries its type, its default (none: the key is required; :data:`OPTIONAL`: it may
be absent) and its description, given once with :func:`setting`::

    @dataclass(frozen=True, kw_only=True)
    class Probe:
        \"\"\"the probe's features\"\"\"

        normalize: bool = setting(False, "L2-normalise the CLS feature before the head")

The class is the one source of the method's part of the config schema (:func:`schema_of`, read by
:func:`ifcl.config.schema`, and so of config/README.md) and of its defaults, which validation fills in. Field types:
``bool``, ``int``, ``float``, ``str``, ``Literal[...]`` (a choice), ``list[int]`` or ``list[float]``, ``X | None``
(null allowed), ``Literal["all"] | list[int]`` (a keyword or a list) and another settings class. Constraints are
keyword arguments of :func:`setting`: ``minimum``, ``maximum``, ``exclusive_minimum``, ``exclusive_maximum``, ``multiple_of`` (numbers),
``items_minimum`` (list items), ``min_items``, ``max_items``, ``unique_items`` (lists). A class may add JSON-schema keywords to
its object with a class attribute ``SCHEMA`` (e.g. ``{"dependentRequired": {...}}``).
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing

OPTIONAL = object()  # a key that may be absent (its field is then None); not the same as a default of None

_CONSTRAINTS = {"minimum": "minimum", "maximum": "maximum", "exclusive_minimum": "exclusiveMinimum",
                "exclusive_maximum": "exclusiveMaximum", "multiple_of": "multipleOf"}
_LIST_CONSTRAINTS = {"min_items": "minItems", "max_items": "maxItems", "unique_items": "uniqueItems"}


def setting(default=dataclasses.MISSING, doc: str = "", **constraints):
    """A settings field: its default (none given: required; :data:`OPTIONAL`: may be absent), its description
    and its constraints (see the module's docstring)."""
    unknown = set(constraints) - set(_CONSTRAINTS) - set(_LIST_CONSTRAINTS) - {"items_minimum"}
    if unknown:
        raise TypeError(f"unknown constraints {sorted(unknown)}")
    metadata = {"doc": doc, "constraints": constraints, "optional": default is OPTIONAL}
    if default is OPTIONAL:
        return dataclasses.field(default=None, metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _is_settings(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _type_schema(hint, constraints: dict) -> dict:
    """The JSON schema of one field's type, with its constraints."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) < len(args):  # X | None
            inner = _type_schema(rest[0] if len(rest) == 1 else typing.Union[tuple(rest)], constraints)
            if "type" in inner:
                return {**inner, "type": [inner["type"], "null"]}
            return {"oneOf": [inner, {"type": "null"}]}
        return {"oneOf": [_type_schema(a, constraints) for a in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple):
        items = _type_schema(args[0], {"minimum": constraints["items_minimum"]} if "items_minimum" in constraints else {})
        out = {"type": "array", "items": items}
        out.update({key: constraints[name] for name, key in _LIST_CONSTRAINTS.items() if name in constraints})
        return out
    if _is_settings(hint):
        return schema_of(hint)
    base = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(hint)
    if base is None:
        raise TypeError(f"settings fields cannot have type {hint!r}")
    out = {"type": base}
    if base in ("integer", "number"):
        out.update({key: constraints[name] for name, key in _CONSTRAINTS.items() if name in constraints})
    return out


def field_schema(f: dataclasses.Field, hint) -> dict:
    """One field's schema: its type's, its description and its default."""
    out = _type_schema(hint, f.metadata.get("constraints", {}))
    if f.metadata.get("doc"):  # the field's description, before its settings class's docstring
        out = {"description": f.metadata["doc"], **{k: v for k, v in out.items() if k != "description"}}
    if f.default is not dataclasses.MISSING and not f.metadata.get("optional"):
        out["default"] = plain(f.default)
    elif f.default_factory is not dataclasses.MISSING:
        out["default"] = f.default_factory()
    return out


def plain(value):
    """A settings object as its config mapping (absent optional keys left out); other values as they are."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("optional") and getattr(value, f.name) is None)}
    return value


def required(cls) -> list[str]:
    """The fields an experiment must give (those without a default)."""
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def properties(cls) -> dict:
    """The JSON-schema properties of a settings class's fields, in their order."""
    hints = typing.get_type_hints(cls)
    return {f.name: field_schema(f, hints[f.name]) for f in dataclasses.fields(cls)}


def schema_of(cls) -> dict:
    """The JSON schema of a settings class as a mapping: its fields, its required ones, nothing else; its
    docstring as the description."""
    out = {}
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses write a signature where there is no docstring
        out["description"] = " ".join(doc.split())
    out.update({"type": "object", "properties": properties(cls)})
    if required(cls):
        out["required"] = required(cls)
    out.update(copy.deepcopy(getattr(cls, "SCHEMA", {})))
    out["additionalProperties"] = False
    return out


def build(cls, value: dict):
    """A settings object from its mapping in a validated config (nested classes built too; absent optional keys
    None)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in value:
            continue
        v, hint = value[f.name], hints[f.name]
        kwargs[f.name] = build(hint, v) if _is_settings(hint) and isinstance(v, dict) else v
    return cls(**kwargs)
