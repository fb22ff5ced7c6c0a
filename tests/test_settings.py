"""Typed settings (ifcl.settings): a settings dataclass is the one source of its keys' schema, defaults and docs."""
from dataclasses import dataclass
from typing import Literal

import pytest

from conftest import REPO
from ifcl.settings import OPTIONAL, build, plain, required, schema_of, setting


@dataclass(frozen=True, kw_only=True)
class Inner:
    """the inner block"""

    SCHEMA = {"dependentRequired": {"a": ["b"]}}

    a: list[int] = setting(OPTIONAL, "first", items_minimum=1, min_items=1)
    b: list[int] = setting(OPTIONAL, "second")


@dataclass(frozen=True, kw_only=True)
class Outer:
    rank: int = setting(doc="the rank", minimum=1)
    ratio: float = setting(0.5, "a ratio", exclusive_minimum=0, maximum=1)
    mode: Literal["x", "y"] = setting("x", "the mode")
    blocks: Literal["all"] | list[int] = setting(doc="blocks", items_minimum=0, unique_items=True)
    scale: float | None = setting(doc="null: the width", exclusive_minimum=0)
    inner: Inner = setting(Inner(), "nested")
    flag: bool = setting(False)


def test_a_settings_class_gives_its_json_schema():
    assert schema_of(Outer) == {
        "type": "object",
        "properties": {
            "rank": {"description": "the rank", "type": "integer", "minimum": 1},
            "ratio": {"description": "a ratio", "type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.5},
            "mode": {"description": "the mode", "enum": ["x", "y"], "default": "x"},
            "blocks": {"description": "blocks", "oneOf": [
                {"enum": ["all"]}, {"type": "array", "items": {"type": "integer", "minimum": 0}, "uniqueItems": True}]},
            "scale": {"description": "null: the width", "type": ["number", "null"], "exclusiveMinimum": 0},
            "inner": {"description": "nested", "type": "object", "properties": {
                "a": {"description": "first", "type": "array", "items": {"type": "integer", "minimum": 1},
                      "minItems": 1},
                "b": {"description": "second", "type": "array", "items": {"type": "integer"}}},
                "dependentRequired": {"a": ["b"]}, "additionalProperties": False, "default": {}},
            "flag": {"type": "boolean", "default": False},
        },
        "required": ["rank", "blocks", "scale"],
        "additionalProperties": False,
    }
    assert required(Outer) == ["rank", "blocks", "scale"]


def test_settings_objects_round_trip_through_their_mapping():
    value = {"rank": 2, "blocks": "all", "scale": None, "inner": {"a": [1], "b": [2]}}
    settings = build(Outer, value)
    assert settings.inner == Inner(a=[1], b=[2]) and settings.ratio == 0.5 and settings.mode == "x"
    assert plain(settings) == {**value, "ratio": 0.5, "mode": "x", "flag": False}
    assert plain(Inner()) == {}  # absent optional keys stay absent


def test_unknown_constraints_and_types_are_refused():
    with pytest.raises(TypeError, match="unknown constraints"):
        setting(1, "x", minimun=0)

    @dataclass(frozen=True)
    class Bad:
        when: complex = setting(1j)

    with pytest.raises(TypeError, match="cannot have type"):
        schema_of(Bad)


def test_every_registered_method_declares_typed_settings_and_the_config_validates_with_their_defaults():
    from ifcl.config import load_config
    from ifcl.registry import methods

    assert all(m.settings is not None for m in methods().values())
    config = load_config(REPO / "config" / "demo.yaml")
    diki = next(e for e in config["experiments"].values() if e["method"] == "diki")
    assert diki["prefix"]["attention"] == "residual" and diki["calibration"]["weight"] == "likelihood"
