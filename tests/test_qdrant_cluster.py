"""The Qdrant cluster layout: collections are created with the configured shards, replication and
write consistency, and every index write carries the configured ordering. Local mode runs the
calls for real (it has one node, so it keeps no replicas); a recording client checks what reaches
qdrant-client, which is what a cluster would be sent."""

from __future__ import annotations

from typing import Any

import pytest
from qdrant_client import QdrantClient, models

from mcp_rag.index.base import IndexPoint, PointPayload
from mcp_rag.index.qdrant_server import ClusterParams, QdrantServerIndex, cluster_params
from mcp_rag.settings import Settings
from mcp_rag.types import ModelIdentity, SparseVector

MODEL = ModelIdentity("test/model", 4)


class RecordingClient(QdrantClient):
    """qdrant-client's local mode, noting the keyword arguments of each call it is given."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def create_collection(self, collection_name: str, **kwargs: Any) -> bool:  # type: ignore[override]
        self.calls.append(("create_collection", collection_name, kwargs))
        return super().create_collection(collection_name, **kwargs)

    def upsert(self, collection_name: str, points: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.calls.append(("upsert", collection_name, kwargs))
        return super().upsert(collection_name, points, **kwargs)

    def delete(self, collection_name: str, points_selector: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.calls.append(("delete", collection_name, kwargs))
        return super().delete(collection_name, points_selector, **kwargs)

    def set_payload(self, collection_name: str, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.calls.append(("set_payload", collection_name, kwargs))
        return super().set_payload(collection_name, payload, **kwargs)


def point(i: int) -> IndexPoint:
    payload = PointPayload(tenant="t", collection="c", document_id=f"d{i}", source_uri=f"mem://{i}", metadata={})
    return IndexPoint(i, [1.0, 0.0, 0.0, float(i)], SparseVector([i], [1.0]), payload)


async def exercise(index: QdrantServerIndex) -> None:
    await index.open(MODEL)
    await index.upsert([point(1), point(2)])
    await index.set_cursor(7)
    await index.delete_points([1])
    await index.delete_documents("t", ["d2"])
    assert await index.get_cursor() == 7


async def test_collections_and_writes_carry_the_cluster_settings() -> None:
    client = RecordingClient()
    index = QdrantServerIndex(client, "chunks")
    await exercise(index)
    created = {name: kwargs for call, name, kwargs in client.calls if call == "create_collection"}
    assert {k: created["chunks"][k] for k in ("shard_number", "replication_factor", "write_consistency_factor")} == {
        "shard_number": 3,
        "replication_factor": 2,
        "write_consistency_factor": 1,
    }
    # The cursor and model identity are one point: one shard, as many copies as the chunks.
    assert (created["chunks__meta"]["shard_number"], created["chunks__meta"]["replication_factor"]) == (1, 2)
    writes = [(call, kwargs) for call, _, kwargs in client.calls if call != "create_collection"]
    assert {call for call, _ in writes} == {"upsert", "delete"}  # the cursor is the meta point's upsert
    assert all(kwargs["ordering"] == models.WriteOrdering.MEDIUM and kwargs["wait"] is True for _, kwargs in writes)


async def test_the_layout_comes_from_the_settings() -> None:
    settings = Settings(
        qdrant_shards=6,
        qdrant_replication_factor=3,
        qdrant_write_consistency_factor=2,
        qdrant_write_ordering="strong",
        _env_file=None,  # type: ignore[call-arg]
    )
    params = cluster_params(settings)
    assert params == ClusterParams(shards=6, replication_factor=3, write_consistency_factor=2, ordering="strong")
    client = RecordingClient()
    await exercise(QdrantServerIndex(client, "chunks", params))
    created = {name: kwargs for call, name, kwargs in client.calls if call == "create_collection"}
    assert (created["chunks"]["shard_number"], created["chunks"]["replication_factor"]) == (6, 3)
    assert created["chunks"]["write_consistency_factor"] == 2
    assert {kwargs["ordering"] for call, _, kwargs in client.calls if call != "create_collection"} == {
        models.WriteOrdering.STRONG
    }


def test_a_write_consistency_above_the_replication_is_refused() -> None:
    with pytest.raises(ValueError, match="WRITE_CONSISTENCY_FACTOR must not exceed"):
        Settings(qdrant_replication_factor=2, qdrant_write_consistency_factor=3, _env_file=None)  # type: ignore[call-arg]
