"""What both Qdrant engines store and filter on, independent of either client library: the payload of
a point, how metadata keys become payload paths, and how a ``SearchFilter`` becomes conditions (each
engine supplies the few constructors of its own library)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from ..types import MetadataValue
from .base import Hit, PointPayload, SearchFilter

C = TypeVar("C")

_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def payload_of(p: PointPayload) -> dict[str, Any]:
    metadata = {k: v if isinstance(v, str | int | float | bool) else list(v) for k, v in p.metadata.items()}
    return {
        "tenant": p.tenant,
        "collection": p.collection,
        "document_id": p.document_id,
        "source_uri": p.source_uri,
        "metadata": metadata,
    }


HIT_PAYLOAD = ["document_id"]
"""What a query reads of each hit's payload."""


def hit_of(point_id: object, score: float, payload: Mapping[str, Any] | None) -> Hit:
    """A query's point, read with ``HIT_PAYLOAD``, as a ``Hit``."""
    return Hit(id=int_id(point_id), score=score, document_id=str((payload or {})["document_id"]))


def metadata_key(key: str) -> str:
    """The payload path of a metadata key."""
    if _SIMPLE_KEY.fullmatch(key):
        return f"metadata.{key}"
    if '"' in key:
        raise ValueError(f"metadata key {key!r} cannot be filtered on (contains a double quote)")
    return f'metadata."{key}"'  # quoted JSON path segment: dots, spaces, ... are literal


def int_id(point_id: object) -> int:
    if isinstance(point_id, int):
        return point_id
    raise TypeError(f"unexpected non-integer point id {point_id!r}")


class Conditions(Protocol, Generic[C]):
    """The condition constructors of one engine's client library."""

    def match(self, key: str, value: str | int | bool) -> C: ...

    def match_float(self, key: str, value: float) -> C: ...

    def match_any(self, key: str, values: list[str] | list[int]) -> C: ...

    def prefix(self, key: str, prefix: str) -> C: ...

    def any_of(self, conditions: list[C]) -> C: ...


def equals(c: Conditions[C], key: str, value: MetadataValue) -> C:
    # The match conditions take str/int/bool only: a float matches as a one-point range.
    return c.match_float(key, value) if isinstance(value, float) else c.match(key, value)


def one_of(c: Conditions[C], key: str, values: Sequence[MetadataValue]) -> C:
    values = list(values)
    if all(isinstance(v, str) for v in values):  # also the empty list, which matches nothing
        return c.match_any(key, [str(v) for v in values])
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return c.match_any(key, [int(v) for v in values])
    return c.any_of([equals(c, key, v) for v in values])  # mixed types, floats, bools


def conditions_of(c: Conditions[C], f: SearchFilter) -> list[C]:
    """Every condition of ``f``, all of which must hold (the tenant always among them)."""
    must = [equals(c, "tenant", f.tenant)]
    if f.collections is not None:
        must.append(one_of(c, "collection", f.collections))
    if f.document_ids is not None:
        must.append(one_of(c, "document_id", f.document_ids))
    if f.source_prefix is not None:
        must.append(c.prefix("source_uri", f.source_prefix))
    for key, value in f.metadata.items():
        path = metadata_key(key)
        must.append(equals(c, path, value) if isinstance(value, str | int | float | bool) else one_of(c, path, value))
    return must
