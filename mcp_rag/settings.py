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
EmbeddingQuantization = Literal["none", "int8"]
WriteOrdering = Literal["weak", "medium", "strong"]
Scope = Literal["read", "write", "metrics"]

OAUTH_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
"""Asymmetric JWS algorithms only: ``none`` and the HMAC family (a shared secret, which a resource
server would have to hold, or worse, the public key used as one) are never accepted."""


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


def _directories(value: list[Path]) -> list[Path]:
    roots = []
    for root in value:
        if not root.is_dir():
            raise ValueError(f"allowed root {str(root)!r} does not exist or is not a directory")
        roots.append(root.resolve())
    return roots


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
    index_flush_seconds: float = Field(default=5.0, ge=0)
    """Embedded index: flush its segments once for all the writes of this many seconds (0: after every write).
    The WAL holds each write meanwhile; after an unclean stop the change log re-applies the unflushed ones."""
    index_compact_points: int = Field(default=10_000, ge=0)
    """Embedded index: once this many points (or half the index, whichever is more) were written since the
    last compaction, a child process optimises a copy (HNSW graph, deleted points dropped) that then replaces
    the shard, while the server goes on serving. 0: never (every search then scans every point)."""

    # --- embeddings ----------------------------------------------------------------
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    embedding_model_dir: Path | None = None
    """A local folder holding the model (fastembed layout). Unset: the built-in offline build for the default model."""
    embedding_quantization: EmbeddingQuantization | None = None
    """Which build of the default model (fastembed provider): ``int8`` (ONNX Runtime's dynamic quantisation:
    about half the CPU per embedding; its vectors differ, so it has a model identity of its own) or ``none``
    (float32). Unset: the build the database's vectors were made with, and ``int8`` for a new database. With
    MCP_RAG_EMBEDDING_MODEL_DIR, the folder's BUILD_INFO.json says which it holds (a folder without one is
    taken as this setting says, float32 when unset)."""
    embedding_fused_layer_norm: bool | None = None
    """The int8 build only: run it with ONNX Runtime's SkipLayerNormalization fusion, as mcp-rag did before
    2026-12-01 (model name ``…@int8``). Unfused (``…@int8-unfused``) a passage costs 1.21 and a query 1.15 times
    less CPU; the vectors differ slightly, so each is a model identity of its own. Unset: as the database's
    vectors were made, unfused for a new database."""
    embedding_batch_size: int = Field(default=1, ge=1, le=1024)
    """Passages per model call. The model pads every passage of a call to the longest one, and on CPU a
    larger call saves nothing else, so one passage a call is fastest (docs/benchmarks.md, "One-call-per-document
    ingest") and needs the least memory for activations."""
    embedding_threads: int | None = Field(default=None, ge=1, le=64)
    """Cores the local model uses (unset: every core this process may run on). A lone passage runs on a
    session with this many ONNX Runtime threads; several passages run this many single-threaded calls
    side by side; a query always runs on one thread (docs/benchmarks.md has why)."""
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
    chunk_whole_documents: bool = True
    """A document that fits the model's window behind its title is one chunk, however long chunk_tokens is."""
    max_document_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    ingest_batch_chunks: int = Field(default=256, ge=1, le=10_000)
    """Chunks embedded and committed per batch: bounds ingest memory."""
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Directories ``ingest_file`` may read from (comma-separated), shared by every tenant without its own
    roots. Empty: the tool refuses every path. With API keys of several tenants it needs MCP_RAG_SHARED_ROOTS."""
    tenant_roots: Annotated[dict[str, list[Path]], NoDecode] = Field(default_factory=dict)
    """JSON object: tenant → the directories only its keys may ingest from, e.g. ``{"acme": ["/srv/acme"]}``."""
    shared_roots: bool = False
    """Let the API keys of several tenants share MCP_RAG_ALLOWED_ROOTS (each can ingest every file there)."""
    ingest_job_after_seconds: float = Field(default=20.0, ge=0)
    """An ``ingest_file`` call still running after this long returns a job id and goes on in the background
    (follow it with ``ingest_status``); 0 makes every one a job at once."""
    watch_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Directories (comma-separated) the server keeps in step with the store from file-system events, for the
    default tenant: synced in full at start (pruning), then after each debounced batch of changes."""
    watch_collection: str | None = None
    """The collection MCP_RAG_WATCH_DIRS are synced into (default: the default collection)."""
    watch_debounce_ms: int = Field(default=1000, ge=50, le=60_000)
    """Changes are collected this long after the first one before the folders are synced."""
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
    max_sessions: int = Field(default=1000, ge=1)
    """Open stateful streamable-HTTP sessions of the whole process; beyond it new sessions get 503."""
    max_sessions_per_principal: int = Field(default=16, ge=1)
    """Open stateful streamable-HTTP sessions plus SSE streams of one API key; beyond it new ones get 429."""
    session_idle_seconds: float = Field(default=300.0, gt=0)
    """A stateful streamable-HTTP session with no request in flight for this long is closed."""
    metrics_token: str | None = Field(default=None, min_length=16)
    """A bearer token that may read only ``/metrics`` (for Prometheus); API keys need the ``metrics`` scope."""

    # --- OAuth 2.1 resource server (docs/security.md, "OAuth") ------------------------
    public_url: str | None = None
    """This server's public base URL, e.g. https://rag.example.com. The OAuth resource is <public_url>/mcp."""
    oauth_issuer: str | None = None
    """The authorization server's issuer URL. With public_url set, OAuth access tokens are accepted beside API keys."""
    oauth_tenant_claim: str = Field(default="tenant", min_length=1, max_length=256)
    """The access-token claim naming the caller's tenant (dots reach into nested objects: ``org.tenant``)."""
    oauth_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["RS256", "PS256", "ES256", "EdDSA"]
    )
    """JWS algorithms accepted for JWT access tokens (asymmetric only; never none or HS*)."""
    oauth_clock_skew_seconds: float = Field(default=30.0, ge=0, le=300)
    """Leeway for exp / nbf / iat of JWT access tokens."""
    oauth_jwks_max_age_seconds: float = Field(default=600.0, gt=0)
    """The authorization server's keys are fetched again after this long; if that fails, tokens get 503."""
    oauth_jwks_min_refresh_seconds: float = Field(default=10.0, ge=0)
    """A token with an unknown key id fetches the keys again at most this often."""
    oauth_introspection_client_id: str | None = None
    """Client credentials for RFC 7662 introspection of opaque tokens. Unset: only JWT access tokens are accepted."""
    oauth_introspection_client_secret: str | None = None
    oauth_introspection_cache_seconds: float = Field(default=60.0, ge=0)
    """How long an introspection answer is reused (never beyond the token's own expiry)."""
    oauth_timeout: float = Field(default=5.0, gt=0)
    """Seconds to wait for the authorization server (metadata, keys, introspection)."""

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

    @field_validator(
        "allowed_roots",
        "watch_dirs",
        "url_allowlist",
        "allowed_hosts",
        "allowed_origins",
        "oauth_algorithms",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("tenant_roots", mode="before")
    @classmethod
    def _json_roots(cls, value: object) -> object:
        if isinstance(value, str):
            import json

            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f'MCP_RAG_TENANT_ROOTS must be a JSON object like {{"acme": ["/srv/acme"]}}: {exc}'
                ) from None
        return value

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

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _optional_token(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("qdrant_url", "embedding_base_url", "reranker_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value

    @field_validator("public_url", "oauth_issuer")
    @classmethod
    def _oauth_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            raise ValueError(f"must be an https:// URL (http:// only on a loopback host), got {value!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"must not carry a query, fragment or credentials, got {value!r}")
        return value.strip().rstrip("/")

    @field_validator("oauth_algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        refused = [alg for alg in value if alg not in OAUTH_ALGORITHMS]
        if refused:
            raise ValueError(
                f"unsupported or unsafe JWS algorithms {refused}: choose from {sorted(OAUTH_ALGORITHMS)} "
                "(none and HMAC are never accepted)"
            )
        if not value:
            raise ValueError("at least one JWS algorithm is needed")
        return value

    @field_validator("embedding_model_dir")
    @classmethod
    def _model_dir(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_dir():
            raise ValueError(f"embedding model directory {str(value)!r} does not exist or is not a directory")
        return value

    @field_validator("watch_dirs")
    @classmethod
    def _watched(cls, value: list[Path]) -> list[Path]:
        for folder in value:
            if not folder.is_dir():
                raise ValueError(f"watched folder {str(folder)!r} does not exist or is not a directory")
        return [folder.resolve() for folder in value]

    @field_validator("allowed_roots")
    @classmethod
    def _roots(cls, value: list[Path]) -> list[Path]:
        return _directories(value)

    @field_validator("tenant_roots")
    @classmethod
    def _tenants_roots(cls, value: dict[str, list[Path]]) -> dict[str, list[Path]]:
        return {tenant: _directories(roots) for tenant, roots in value.items()}

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
        if (self.oauth_issuer is None) != (self.public_url is None):
            raise ValueError(
                "OAuth needs both MCP_RAG_OAUTH_ISSUER (the authorization server) and MCP_RAG_PUBLIC_URL "
                "(this server's public base URL)"
            )
        if (self.oauth_introspection_client_id is None) != (self.oauth_introspection_client_secret is None):
            raise ValueError(
                "introspection needs both MCP_RAG_OAUTH_INTROSPECTION_CLIENT_ID and MCP_RAG_OAUTH_INTROSPECTION_CLIENT_SECRET"
            )
        if self.oauth_introspection_client_id and not self.oauth_issuer:
            raise ValueError("MCP_RAG_OAUTH_INTROSPECTION_CLIENT_ID needs MCP_RAG_OAUTH_ISSUER as well")
        if self.embedding_provider == "openai" and self.embedding_base_url is None:
            raise ValueError("MCP_RAG_EMBEDDING_PROVIDER is 'openai' but MCP_RAG_EMBEDDING_BASE_URL is not set")
        if self.embedding_api_key and self.embedding_api_key_file:
            raise ValueError("set MCP_RAG_EMBEDDING_API_KEY or MCP_RAG_EMBEDDING_API_KEY_FILE, not both")
        if self.embedding_quantization == "int8" and self.embedding_provider != "fastembed":
            raise ValueError(
                "MCP_RAG_EMBEDDING_QUANTIZATION=int8 chooses a build of the local fastembed model; "
                f"the {self.embedding_provider} provider's server decides how its model runs"
            )
        if self.reranker_api_key and self.reranker_api_key_file:
            raise ValueError("set MCP_RAG_RERANKER_API_KEY or MCP_RAG_RERANKER_API_KEY_FILE, not both")
        if self.qdrant_write_consistency_factor > self.qdrant_replication_factor:
            raise ValueError(
                "MCP_RAG_QDRANT_WRITE_CONSISTENCY_FACTOR must not exceed MCP_RAG_QDRANT_REPLICATION_FACTOR"
            )
        tokens = [key.token for key in self.api_keys]
        if len(set(tokens)) != len(tokens):
            raise ValueError("MCP_RAG_API_KEYS lists the same token twice")
        sharing = sorted({key.tenant for key in self.api_keys} - set(self.tenant_roots))
        if self.allowed_roots and len(sharing) > 1 and not self.shared_roots:
            raise ValueError(
                f"the tenants {', '.join(sharing)} would share MCP_RAG_ALLOWED_ROOTS (each could ingest every file "
                "there): give each its own roots with MCP_RAG_TENANT_ROOTS, or set MCP_RAG_SHARED_ROOTS=true"
            )
        if self.metrics_token is not None and self.metrics_token in tokens:
            raise ValueError("MCP_RAG_METRICS_TOKEN must differ from every API key")
        return self

    @property
    def resolved_index_backend(self) -> IndexBackend:
        if self.index_backend is not None:
            return self.index_backend
        return "qdrant" if self.qdrant_url else "embedded"

    def secret(self, value: str | None, file: Path | None, name: str) -> str | None:
        """A secret given inline or as a file (a mounted secret), stripped of surrounding whitespace;
        an unreadable file is a ConfigurationError naming the setting."""
        if file is None:
            return value
        try:
            return file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            from .errors import ConfigurationError

            raise ConfigurationError(f"cannot read {name} {str(file)!r}: {exc.strerror or exc}") from None

    @property
    def oauth_enabled(self) -> bool:
        return self.oauth_issuer is not None and self.public_url is not None

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def embedded_postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def embedded_index_dir(self) -> Path:
        return self.data_dir / "index"
