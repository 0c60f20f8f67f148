"""Prometheus metrics, one registry per process, served at ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

TOOL_CALLS = Counter(
    "mcp_rag_tool_calls", "MCP tool calls by tool and outcome.", ["tool", "outcome"], registry=REGISTRY
)
TOOL_LATENCY = Histogram(
    "mcp_rag_tool_duration_seconds",
    "MCP tool call latency.",
    ["tool"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
CHUNKS_INGESTED = Counter("mcp_rag_chunks_ingested", "Chunks written to the store.", registry=REGISTRY)
DOCUMENTS_INGESTED = Counter(
    "mcp_rag_documents_ingested", "Documents by ingest outcome.", ["status"], registry=REGISTRY
)
EMBED_BATCH_SECONDS = Histogram(
    "mcp_rag_embedding_batch_seconds",
    "Time to embed one batch of passages.",
    registry=REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
)
INDEX_LAG = Gauge(
    "mcp_rag_index_lag_entries", "Change-log entries not yet applied to this region's index.", registry=REGISTRY
)
REPLICATION_LAG = Gauge(
    "mcp_rag_replication_lag_seconds",
    "Seconds the read database is behind the primary: 0 on the primary and on a streaming replica that has "
    "replayed all it received; otherwise an upper bound that grows while the replica is cut off.",
    registry=REGISTRY,
)
RERANK_SECONDS = Histogram(
    "mcp_rag_rerank_seconds",
    "Time the reranker took per search (failures included).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
    registry=REGISTRY,
)
RERANK_FAILURES = Counter(
    "mcp_rag_rerank_failures", "Searches answered in fused order because the reranker failed.", registry=REGISTRY
)
CHANGES_APPLIED = Counter("mcp_rag_changes_applied", "Change-log entries applied to the index.", registry=REGISTRY)
SYNC_OVERLAPS = Counter(
    "mcp_rag_sync_overlaps",
    "Sync passes that found the index cursor moved by another pass (the sync lock did not exclude it).",
    registry=REGISTRY,
)
INDEX_REBUILDS = Counter(
    "mcp_rag_index_rebuilds", "Automatic index rebuilds after the change log's history changed.", registry=REGISTRY
)
INDEX_COMPACTIONS = Counter(
    "mcp_rag_index_compactions",
    "Compactions of the embedded index (an optimised copy swapped in), by outcome: done or failed.",
    ["outcome"],
    registry=REGISTRY,
)
