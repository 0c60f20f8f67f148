"""``compact_schema``: a smaller ``tools/list`` that validates exactly what the generated schemas do."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.server import MCPServer

from mcp_rag.server import build_server
from mcp_rag.tools.schema import compact_schema

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


async def generated_schemas() -> list[tuple[str, dict[str, Any]]]:
    """Every tool's generated input and output schema, and every property schema in them with its
    ``$defs``."""
    out: list[tuple[str, dict[str, Any]]] = []
    server = build_server(lambda: None)  # type: ignore[arg-type, return-value]
    for listed in await MCPServer.list_tools(server):  # as generated, before compaction
        for kind, schema in (("in", listed.input_schema), ("out", listed.output_schema or {})):
            out.append((f"{listed.name}.{kind}", schema))
            defs = schema.get("$defs", {})
            for name, prop in schema.get("properties", {}).items():
                out.append((f"{listed.name}.{kind}.{name}", {**prop, "$defs": defs}))
            for def_name, sub in defs.items():
                for name, prop in sub.get("properties", {}).items():
                    out.append((f"{listed.name}.{def_name}.{name}", {**prop, "$defs": defs}))
    return out


SCHEMAS = asyncio.run(generated_schemas())


def valid(schema: dict[str, Any], value: Any) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SCHEMAS), json_values)
def test_compact_schemas_accept_and_reject_the_same_values(case: tuple[str, dict[str, Any]], value: Any) -> None:
    name, schema = case
    assert valid(schema, value) == valid(compact_schema(schema), value), (name, value)


def test_nullable_fields_become_type_lists_and_refs_stay() -> None:
    nullable = {"anyOf": [{"maxLength": 3, "type": "string"}, {"type": "null"}], "default": None, "title": "Name"}
    assert compact_schema(nullable) == {"type": ["string", "null"], "maxLength": 3}
    for value, ok in (("abc", True), ("abcd", False), (None, True), (3, False)):
        assert valid(compact_schema(nullable), value) is ok
    referenced = {"anyOf": [{"$ref": "#/$defs/Report"}, {"type": "null"}], "default": None}
    assert compact_schema(referenced) == {"anyOf": [{"$ref": "#/$defs/Report"}, {"type": "null"}]}
    # an alternative constraining every type (an enum) is not merged
    choice = {"anyOf": [{"enum": ["a", "b"], "type": "string"}, {"type": "null"}]}
    assert compact_schema(choice) == choice


def test_data_and_property_names_are_not_rewritten() -> None:
    schema = {
        "properties": {"title": {"type": "string", "title": "Title"}, "mode": {"default": "hybrid", "enum": ["x"]}},
        "examples": [{"title": "kept", "default": None}],
    }
    assert compact_schema(schema) == {
        "properties": {"title": {"type": "string"}, "mode": {"default": "hybrid", "enum": ["x"]}},
        "examples": [{"title": "kept", "default": None}],
    }


async def test_tools_list_carries_the_compact_schemas() -> None:
    async with Client(build_server(lambda: None)) as client:  # type: ignore[arg-type, return-value]
        listed = (await client.list_tools()).tools
    text = json.dumps([t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in listed])
    assert '"default": null' not in text and '"Document Id"' not in text
    search = next(t for t in listed if t.name == "search")
    assert search.input_schema["properties"]["collection"]["type"] == ["string", "null"]


def test_definitions_used_once_are_written_in_place() -> None:
    schema = {
        "properties": {
            "hits": {"items": {"$ref": "#/$defs/Hit"}, "type": "array"},
            "report": {"anyOf": [{"$ref": "#/$defs/Report"}, {"type": "null"}], "description": "When done."},
        },
        "$defs": {
            "Hit": {"properties": {"passages": {"items": {"$ref": "#/$defs/Passage"}}}, "type": "object"},
            "Passage": {"properties": {"text": {"type": "string"}}, "required": ["text"], "type": "object"},
            "Report": {"properties": {"added": {"type": "integer"}}, "type": "object"},
        },
    }
    compact = compact_schema(schema)
    assert "$defs" not in compact and "$ref" not in json.dumps(compact)
    passage = compact["properties"]["hits"]["items"]["properties"]["passages"]["items"]
    assert passage == {"properties": {"text": {"type": "string"}}, "required": ["text"], "type": "object"}
    # the inlined object merges with its null alternative like any other type
    assert compact["properties"]["report"]["type"] == ["object", "null"]
    for value, ok in (
        ({"hits": [{"passages": [{"text": "a"}]}], "report": None}, True),
        ({"hits": [{"passages": [{}]}]}, False),
        ({"report": {"added": "3"}}, False),
    ):
        assert valid(schema, value) is ok and valid(compact, value) is ok


def test_shared_and_recursive_definitions_stay_referenced() -> None:
    shared = {"type": "object", "properties": {"text": {"type": "string"}}}
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}
    schema = {
        "properties": {
            "a": {"$ref": "#/$defs/Shared"},
            "b": {"$ref": "#/$defs/Shared"},
            "root": {"$ref": "#/$defs/Node"},
            "odd": {"$ref": "#/$defs/Odd", "type": "object"},  # a sibling that constrains: kept as written
        },
        "$defs": {"Shared": shared, "Node": tree, "Odd": {"required": ["x"]}},
    }
    compact = compact_schema(schema)
    assert set(compact["$defs"]) == {"Shared", "Node", "Odd"}
    assert compact["properties"]["a"] == {"$ref": "#/$defs/Shared"}
    assert compact["properties"]["root"] == {"$ref": "#/$defs/Node"}
    deep = {"root": {"children": [{"children": [{"children": "no"}]}]}}
    assert not valid(schema, deep) and not valid(compact, deep)


async def test_search_results_validate_without_references() -> None:
    """The output schema a client validates every search against carries no reference to resolve."""
    async with Client(build_server(lambda: None)) as client:  # type: ignore[arg-type, return-value]
        listed = {t.name: t for t in (await client.list_tools()).tools}
    schema = listed["search"].output_schema
    assert schema is not None and "$ref" not in json.dumps(schema) and "$defs" not in schema
    hit = schema["properties"]["results"]["items"]
    assert {"document_id", "source_uri", "text", "passages"} <= set(hit["properties"])


def test_properties_named_like_keywords_are_properties() -> None:
    schema = {
        "properties": {
            "default": {"$ref": "#/$defs/Value"},
            "$defs": {"type": "string"},
            "enum": {"items": {"$ref": "#/$defs/Value"}, "type": "array"},
        },
        "$defs": {"Value": {"type": "integer"}},
    }
    compact = compact_schema(schema)
    assert set(compact["properties"]) == {"default", "$defs", "enum"}
    assert compact["properties"]["$defs"] == {"type": "string"}
    assert compact["$defs"] == {"Value": {"type": "integer"}}  # referenced twice: kept
    for value, ok in (({"default": 1, "$defs": "x", "enum": [2]}, True), ({"default": "1"}, False)):
        assert valid(schema, value) is ok and valid(compact, value) is ok
