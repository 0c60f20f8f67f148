"""`.env.example` documents every setting, and its values are the defaults."""

from __future__ import annotations

from pathlib import Path

from mcp_rag.settings import Settings

EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"


def _entries() -> dict[str, str | None]:
    entries: dict[str, str | None] = {}
    for raw in EXAMPLE.read_text().splitlines():
        line = raw.lstrip("# ").strip()
        if line.startswith("MCP_RAG_") and "=" in line:
            name, _, value = line.partition("=")
            commented = raw.lstrip().startswith("#")
            entries.setdefault(name, None if commented else value)
    return entries


def test_every_setting_is_listed() -> None:
    listed = set(_entries())
    expected = {f"MCP_RAG_{name.upper()}" for name in Settings.model_fields}
    assert expected - listed == set(), "settings missing from .env.example"
    assert listed - expected == set(), ".env.example lists settings that do not exist"


def test_uncommented_values_are_the_defaults() -> None:
    values = {name: value for name, value in _entries().items() if value is not None}
    from_example = Settings(_env_file=EXAMPLE)  # type: ignore[call-arg]
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    for name in values:
        field = name.removeprefix("MCP_RAG_").lower()
        assert getattr(from_example, field) == getattr(defaults, field), name
