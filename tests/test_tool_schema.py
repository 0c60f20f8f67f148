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
    """Every property schema of every tool's generated input and output schema, with its ``$defs``."""
    out: list[tuple[str, dict[str, Any]]] = []
    server = build_server(lambda: None)  # type: ignore[arg-type, return-value]
    for listed in await MCPServer.list_tools(server):  # as generated, before compaction
        for kind, schema in (("in", listed.input_schema), ("out", listed.output_schema or {})):
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
