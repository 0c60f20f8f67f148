"""All configuration, read once from ``MCP_RAG_*`` environment variables and ``.env``.

Nothing else in the package reads the environment: the ``Settings`` object is built at
start-up and passed down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

IndexBackend = Literal["embedded", "qdrant"]
EmbeddingProvider = Literal["fastembed", "openai"]
WriteOrdering = Literal["weak", "medium", "strong"]
Scope = Literal["read", "write"]


def default_data_dir() -> Path:
    """Where the embedded Postgres, the embedded index and the built model live by default.

    As root this is ``/var/lib/mcp-rag`` (the embedded Postgres adds o+rx to every parent
    folder of its data directory, so it must never sit under ``/root``); otherwise the XDG
    data directory.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/mcp-rag")
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "mcp-rag"


def _all_scopes() -> list[Scope]:
    return ["read", "write"]


class ApiKey(BaseModel, extra="forbid"):
    """One bearer token accepted by the HTTP transports."""

    token: str = Field(min_length=16)
    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    scopes: list[Scope] = Field(default_factory=_all_scopes)


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


ENV_PREFIX = "MCP_RAG_"
RESERVED_ENV_PREFIXES = ("MCP_RAG_TEST_",)
"""Variables the test suite reads itself (never settings)."""


class _UnknownEnvVars(PydanticBaseSettingsSource):
    """Reports ``MCP_RAG_*`` environment variables that name no setting.

    pydantic-settings silently ignores them (it rejects unknown keys only in ``.env`` and in
    keyword arguments), so a misspelt variable would otherwise be dropped without a word.
    They are returned under their full lower-case name, as the ``.env`` source reports its
    unknown keys, and ``extra="forbid"`` turns each into an error naming the variable.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        known = set(self.settings_cls.model_fields)
        unknown: dict[str, Any] = {}
        for name, value in os.environ.items():
            upper = name.upper()
            if not upper.startswith(ENV_PREFIX) or upper.startswith(RESERVED_ENV_PREFIXES):
                continue
            if upper[len(ENV_PREFIX) :].lower() not in known:
                unknown[name.lower()] = value
        return unknown


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MCP_RAG_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    # --- storage -------------------------------------------------------------------
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None
    """Write DSN (the Postgres primary). Unset: an embedded Postgres under data_dir."""
    database_read_url: str | None = None
    """Read DSN (a local replica). Unset: reads use database_url."""
    db_pool_min: int = Field(default=1, ge=0, le=100)
    db_pool_max: int = Field(default=10, ge=1, le=200)
    db_timeout: float = Field(default=5.0, gt=0)
    """Seconds to wait for a database connection before failing the call."""

    index_backend: IndexBackend | None = None
    """``embedded`` (in-process Qdrant engine) or ``qdrant`` (a Qdrant server). Unset: qdrant when qdrant_url is set."""
    qdrant_url: str | None = None
    qdrant_api_key: str | None = None
    qdrant_collection: str = Field(default="mcp_rag_chunks", pattern=r"^[A-Za-z0-9_-]{1,128}$")
    qdrant_timeout: float = Field(default=5.0, gt=0)
    qdrant_shards: int = Field(default=3, ge=1, le=256)
    """Shards of a collection the server creates (one per node of a three-node cluster)."""
    qdrant_replication_factor: int = Field(default=2, ge=1, le=16)
    """Copies of each shard: 2 keeps every shard on a second node when one node is lost."""
    qdrant_write_consistency_factor: int = Field(default=1, ge=1, le=16)
    """Replicas that must acknowledge a write: at most replication_factor - 1 for writes to survive a lost node."""
    qdrant_write_ordering: WriteOrdering = "medium"
    """Ordering of index writes: ``medium`` goes through a dynamically elected leader per shard, so writes keep
    their order and go on when a node is lost (``strong`` stops while the permanent leader's node is down)."""

    # --- embeddings ----------------------------------------------------------------
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    embedding_model_dir: Path | None = None
    """A local folder holding the model (fastembed layout). Unset: the built-in offline build for the default model."""
    embedding_batch_size: int = Field(default=8, ge=1, le=1024)
    """Passages per model call. On CPU, 8 embeds as fast as 32 and its activations need ~370 MiB less."""
    embedding_threads: int | None = Field(default=None, ge=1, le=64)
    embedding_provider: EmbeddingProvider = "fastembed"
    """``fastembed`` (the model in this process) or ``openai`` (any server speaking ``POST /v1/embeddings``)."""
    embedding_base_url: str | None = None
    """The openai provider's API base, up to and including ``/v1`` (e.g. ``http://ollama:11434/v1``)."""
    embedding_api_key: str | None = None
    """Bearer token for the openai provider."""
    embedding_api_key_file: Path | None = None
    """A file holding that token (a mounted secret); read at start."""
    embedding_dimension: int | None = Field(default=None, ge=1, le=65536)
    """The remote model's dimension. Unset: taken from a probe call at start (and checked on every answer)."""
    embedding_request_inputs: int = Field(default=32, ge=1, le=2048)
    """Passages per ``/v1/embeddings`` request."""
    embedding_concurrency: int = Field(default=4, ge=1, le=64)
    """Requests in flight to the provider at once (over every ingest and search of this process)."""
    embedding_timeout: float = Field(default=30.0, gt=0)
    """Seconds one request to the provider may take."""
    embedding_retries: int = Field(default=4, ge=0, le=20)
    """Retries of a request that failed with 429, 5xx, a timeout or a dropped connection (exponential backoff
    with jitter, or the server's Retry-After)."""
    embedding_tokenizer: Path | None = None
    """The remote model's ``tokenizer.json``: chunks are measured in its tokens. Unset: a character budget."""
    embedding_window_tokens: int = Field(default=256, ge=32, le=131072)
    """The remote model's input window in tokens: a text over it is refused, never cut."""
    embedding_chars_per_token: float = Field(default=3.0, ge=1.0, le=16.0)
    """Without a tokenizer: characters counted as one token (3 errs on the long side for English)."""

    # --- ingestion -----------------------------------------------------------------
    chunk_tokens: int = Field(default=200, ge=32, le=256)
    """Target chunk size in model tokens (the model's window is 256)."""
    chunk_overlap_tokens: int = Field(default=32, ge=0, le=128)
    max_document_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    ingest_batch_chunks: int = Field(default=256, ge=1, le=10_000)
    """Chunks embedded and committed per batch: bounds ingest memory."""
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Directories ``ingest_file`` may read from (comma-separated). Empty: the tool refuses every path."""
    url_fetch_timeout: float = Field(default=15.0, gt=0)
    url_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1)
    url_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Hosts or CIDR ranges ``ingest_url`` may reach even though they are private/loopback."""

    # --- search --------------------------------------------------------------------
    fusion: Literal["rrf", "dbsf"] = "dbsf"
    rrf_k: int = Field(default=2, ge=1, le=1000)
    dense_weight: float = Field(default=1.0, ge=0)
    sparse_weight: float = Field(default=1.0, ge=0)
    prefetch_limit: int = Field(default=200, ge=1, le=1000)

    reranker_url: str | None = None
    """A rerank endpoint (``POST``, e.g. ``http://tei-reranker:8080/rerank``) applied after fusion. Unset: none."""
    reranker_model: str | None = None
    reranker_api_key: str | None = None
    reranker_api_key_file: Path | None = None
    reranker_timeout: float = Field(default=2.0, gt=0)
    """Seconds the reranker may take; beyond it the search answers in fused order and says so."""
    reranker_candidates: int = Field(default=30, ge=1, le=200)
    """Fused results sent to the reranker (at least top_k): it reorders them and the best top_k are returned."""

    # --- server --------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Extra Host header values accepted by the HTTP transports (e.g. ``mcp-rag.example.com``, ``svc:*``)."""
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    stateless_http: bool = False
    """Stateless streamable HTTP: any replica can answer any request."""
    read_only: bool = False
    """Register only the read tools."""
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(default_factory=list)
    """JSON list of {token, tenant, scopes}. Empty: HTTP transports refuse to start on a non-loopback host."""
    default_tenant: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """The tenant of stdio sessions and of the CLI."""
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    # --- regions -------------------------------------------------------------------
    region: str = "local"
    sync_in_server: bool = True
    """Run the index sync worker inside the server process."""
    sync_interval_seconds: float = Field(default=1.0, gt=0)
    max_replication_lag_seconds: float = Field(default=30.0, gt=0)
    max_index_lag_entries: int = Field(default=1000, ge=1)

    # --- logging -------------------------------------------------------------------
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _UnknownEnvVars(settings_cls), dotenv_settings, file_secret_settings

    @field_validator("allowed_roots", "url_allowlist", "allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _json_keys(cls, value: object) -> object:
        if isinstance(value, str):
            import json

            try:
                return json.loads(value) if value.strip() else []
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"MCP_RAG_API_KEYS must be a JSON list like "
                    f'[{{"token": "...", "tenant": "acme", "scopes": ["read"]}}]: {exc}'
                ) from None
        return value

    @field_validator("database_url", "database_read_url")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(value)
        except Exception as exc:
            raise ValueError(
                f"not a valid PostgreSQL DSN ({exc}); expected e.g. postgresql://user:pass@host:5432/dbname"
            ) from None
        return value

    @field_validator("qdrant_url", "embedding_base_url", "reranker_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value

    @field_validator("embedding_model_dir")
    @classmethod
    def _model_dir(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_dir():
            raise ValueError(f"embedding model directory {str(value)!r} does not exist or is not a directory")
        return value

    @field_validator("allowed_roots")
    @classmethod
    def _roots(cls, value: list[Path]) -> list[Path]:
        roots = []
        for root in value:
            if not root.is_dir():
                raise ValueError(f"allowed root {str(root)!r} does not exist or is not a directory")
            roots.append(root.resolve())
        return roots

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.index_backend == "qdrant" and self.qdrant_url is None:
            raise ValueError("MCP_RAG_INDEX_BACKEND is 'qdrant' but MCP_RAG_QDRANT_URL is not set")
        if self.database_read_url and not self.database_url:
            raise ValueError("MCP_RAG_DATABASE_READ_URL needs MCP_RAG_DATABASE_URL (the primary) as well")
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("MCP_RAG_CHUNK_OVERLAP_TOKENS must be smaller than MCP_RAG_CHUNK_TOKENS")
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("MCP_RAG_DB_POOL_MIN must not exceed MCP_RAG_DB_POOL_MAX")
        if self.embedding_provider == "openai" and self.embedding_base_url is None:
            raise ValueError("MCP_RAG_EMBEDDING_PROVIDER is 'openai' but MCP_RAG_EMBEDDING_BASE_URL is not set")
        if self.embedding_api_key and self.embedding_api_key_file:
            raise ValueError("set MCP_RAG_EMBEDDING_API_KEY or MCP_RAG_EMBEDDING_API_KEY_FILE, not both")
        if self.reranker_api_key and self.reranker_api_key_file:
            raise ValueError("set MCP_RAG_RERANKER_API_KEY or MCP_RAG_RERANKER_API_KEY_FILE, not both")
        if self.qdrant_write_consistency_factor > self.qdrant_replication_factor:
            raise ValueError(
                "MCP_RAG_QDRANT_WRITE_CONSISTENCY_FACTOR must not exceed MCP_RAG_QDRANT_REPLICATION_FACTOR"
            )
        tokens = [key.token for key in self.api_keys]
        if len(set(tokens)) != len(tokens):
            raise ValueError("MCP_RAG_API_KEYS lists the same token twice")
        return self

    @property
    def resolved_index_backend(self) -> IndexBackend:
        if self.index_backend is not None:
            return self.index_backend
        return "qdrant" if self.qdrant_url else "embedded"

    def secret(self, value: str | None, file: Path | None, name: str) -> str | None:
        """A secret given inline or as a file (a mounted secret), stripped of surrounding whitespace."""
        if file is None:
            return value
        try:
            return file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ValueError(f"cannot read {name} {str(file)!r}: {exc.strerror or exc}") from None

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def embedded_postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def embedded_index_dir(self) -> Path:
        return self.data_dir / "index"
