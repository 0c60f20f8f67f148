"""The JSON schemas ``tools/list`` carries, without what pydantic's generated schemas repeat.

Every client sends ``tools/list`` to its model, so each character is paid on every conversation.
``compact_schema`` keeps the meaning and drops the repetition:

- generated ``title`` annotations ("Document Id" beside ``document_id``); a property *called*
  ``title`` stays;
- ``"default": null`` on optional fields (not being required already says it may be absent);
- ``anyOf`` of a plain type and ``null`` becomes one ``type`` list (``{"type": ["string",
  "null"], "maxLength": 64}``: type-specific keywords apply only to values of their type, so the
  merge validates exactly the same values); ``anyOf`` of bare types becomes one ``type`` list too.
"""

from __future__ import annotations

from typing import Any

_VALUES = frozenset({"default", "const", "enum", "examples"})
"""Keywords whose value is data, not a schema: never rewritten."""
_SCHEMA_MAPS = frozenset({"properties", "$defs", "patternProperties"})
"""Keywords whose value maps names to schemas (a name is not a keyword)."""
_APPLY_TO_ALL = frozenset({"enum", "const", "allOf", "anyOf", "oneOf", "not", "$ref", "if", "then", "else"})
"""Keywords that constrain values of every type: an alternative carrying one is not merged."""


def compact_schema(schema: Any) -> Any:
    """``schema`` with the repetition above removed; validates exactly the same instances."""
    if isinstance(schema, list):
        return [compact_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key == "default" and value is None:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: compact_schema(sub) for name, sub in value.items()}
        elif key in _VALUES:
            out[key] = value
        else:
            out[key] = compact_schema(value)
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
