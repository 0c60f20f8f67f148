"""The JSON schemas ``tools/list`` carries, without what pydantic's generated schemas repeat.

Every client sends ``tools/list`` to its model, so each character is paid on every conversation.
``compact_schema`` keeps the meaning and drops the repetition:

- generated ``title`` annotations ("Document Id" beside ``document_id``); a property *called*
  ``title`` stays;
- ``"default": null`` on optional fields (not being required already says it may be absent);
- ``anyOf`` of a plain type and ``null`` becomes one ``type`` list (``{"type": ["string",
  "null"], "maxLength": 64}``: type-specific keywords apply only to values of their type, so the
  merge validates exactly the same values); ``anyOf`` of bare types becomes one ``type`` list too;
- a ``$defs`` entry referenced once (and not from itself) is written where it is referenced. A
  client validates every result against the tool's output schema, and a reference costs it a
  lookup per value: a page of 10 search hits validated in 0.97 ms instead of 1.10 ms
  (docs/benchmarks.md). The schema gets no longer, since each definition still appears once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

_VALUES = frozenset({"default", "const", "enum", "examples"})
"""Keywords whose value is data, not a schema: never rewritten."""
_SCHEMA_MAPS = frozenset({"properties", "$defs", "patternProperties"})
"""Keywords whose value maps names to schemas (a name is not a keyword)."""
_APPLY_TO_ALL = frozenset({"enum", "const", "allOf", "anyOf", "oneOf", "not", "$ref", "if", "then", "else"})
"""Keywords that constrain values of every type: an alternative carrying one is not merged."""


def compact_schema(schema: Any) -> Any:
    """``schema`` with the repetition above removed; validates exactly the same instances."""
    return _compact(_inline_single_use(schema))


def _compact(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_compact(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key == "default" and value is None:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _compact(sub) for name, sub in value.items()}
        elif key in _VALUES:
            out[key] = value
        else:
            out[key] = _compact(value)
    alternatives = out.get("anyOf")
    if isinstance(alternatives, list):
        merged = _merge_types(alternatives)
        if merged is not None:
            del out["anyOf"]
            clash = set(merged) & set(out)
            if not clash:
                out.update(merged)
            else:  # keywords beside anyOf that the merge would overwrite: keep the anyOf
                out["anyOf"] = alternatives
    return out


def _merge_types(alternatives: list[Any]) -> dict[str, Any] | None:
    """One schema equivalent to ``anyOf: alternatives``, or ``None`` when there is no safe merge.

    Safe: every alternative is a bare ``{"type": T}``, or all are bare but one, and the one
    constrains only its own type (its keywords cannot reject a value of the other types)."""
    if not all(isinstance(a, dict) and isinstance(a.get("type"), str) for a in alternatives):
        return None
    rich = [a for a in alternatives if set(a) != {"type"}]
    if len(rich) > 1 or any(k in _APPLY_TO_ALL for a in rich for k in a):
        return None
    types = [a["type"] for a in alternatives]
    if len(set(types)) != len(types):
        return None
    merged = dict(rich[0]) if rich else {}
    merged["type"] = types
    return merged


_DEFS_REF = "#/$defs/"
_ANNOTATIONS = frozenset({"description", "title"})
"""Keywords beside a ``$ref`` that may take the place of the definition's own when it is inlined."""


def _inline_single_use(schema: Any) -> Any:
    """``schema`` with each definition that is referenced exactly once, and cannot reach itself
    through references, written in place of its reference; the other definitions stay in ``$defs``."""
    if not isinstance(schema, dict) or not isinstance(schema.get("$defs"), dict):
        return schema
    defs: dict[str, Any] = schema["$defs"]
    uses: dict[str, int] = {}
    blocked: set[str] = set()
    for node in _schema_nodes(schema):
        name = _defined_ref(node)
        if name is None:
            continue
        uses[name] = uses.get(name, 0) + 1
        if name not in defs or set(node) - {"$ref"} - _ANNOTATIONS or not isinstance(defs[name], dict):
            blocked.add(name)
    inline = {name for name, count in uses.items() if count == 1 and name not in blocked}
    inline -= {name for name in inline if name in _reachable(defs, name)}

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [resolve(item) for item in node]
        if not isinstance(node, dict):
            return node
        name = _defined_ref(node)
        if name in inline:
            siblings = {key: value for key, value in node.items() if key != "$ref"}
            return {**resolve(defs[name]), **siblings}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _VALUES:
                out[key] = value
            elif key in _SCHEMA_MAPS and isinstance(value, dict):
                out[key] = {sub_name: resolve(sub) for sub_name, sub in value.items()}
            else:
                out[key] = resolve(value)
        return out

    out = resolve({key: value for key, value in schema.items() if key != "$defs"})
    kept = {name: resolve(definition) for name, definition in defs.items() if name not in inline}
    if kept:
        out["$defs"] = kept
    return out


def _defined_ref(node: Any) -> str | None:
    """The ``$defs`` name a ``{"$ref": "#/$defs/<name>"}`` node points at."""
    ref = node.get("$ref") if isinstance(node, dict) else None
    if isinstance(ref, str) and ref.startswith(_DEFS_REF) and "/" not in ref[len(_DEFS_REF) :]:
        return ref[len(_DEFS_REF) :]
    return None


def _schema_nodes(node: Any) -> Iterator[Any]:
    """``node`` and every schema in it (not the data under ``default``, ``enum`` and the like)."""
    yield node
    if isinstance(node, list):
        for item in node:
            yield from _schema_nodes(item)
    elif isinstance(node, dict):
        for key, child in node.items():
            if key in _VALUES:
                continue
            if key in _SCHEMA_MAPS and isinstance(child, dict):
                for sub in child.values():  # keyed by names, which are not keywords
                    yield from _schema_nodes(sub)
            elif isinstance(child, dict | list):
                yield from _schema_nodes(child)


def _reachable(defs: dict[str, Any], start: str) -> set[str]:
    """The definitions reachable from ``defs[start]`` through one or more references."""
    seen: set[str] = set()
    stack = [start]
    while stack:
        for node in _schema_nodes(defs.get(stack.pop())):
            name = _defined_ref(node)
            if name is not None and name not in seen:
                seen.add(name)
                stack.append(name)
    return seen
