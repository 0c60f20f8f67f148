"""Settings: defaults, MCP_RAG_* environment variables and .env, and the messages a wrong value gets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from mcp_rag.cli import load_settings
from mcp_rag.errors import ConfigurationError
from mcp_rag.settings import ApiKey, Settings, default_data_dir


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MCP_RAG_* variable from the outside, and a working directory without a .env file."""
    for name in list(os.environ):
        if name.upper().startswith("MCP_RAG_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config_error(**overrides: object) -> str:
    with pytest.raises(ConfigurationError) as info:
        load_settings(**overrides)
    return str(info.value)


# --- defaults ------------------------------------------------------------------------------


def test_defaults() -> None:
    s = Settings()
    assert s.database_url is None
    assert s.database_read_url is None
    assert s.index_backend is None
    assert s.resolved_index_backend == "embedded"
    assert s.embedding_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert s.embedding_model_dir is None
    assert s.embedding_batch_size == 1
    assert (s.chunk_tokens, s.chunk_overlap_tokens) == (200, 32)
    assert s.ingest_batch_chunks == 256
    assert s.max_document_bytes == 10 * 1024 * 1024
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.fusion == "dbsf"
    assert s.default_tenant == "default"
    assert s.api_keys == []
    assert s.allowed_roots == []
    assert s.allowed_hosts == []
    assert (s.log_format, s.log_level) == ("console", "INFO")
    assert s.data_dir == default_data_dir()
    assert s.models_dir == s.data_dir / "models"
    assert s.embedded_postgres_dir == s.data_dir / "postgres"
    assert s.embedded_index_dir == s.data_dir / "index"


def test_default_data_dir_is_never_under_root_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_data_dir() == Path("/var/lib/mcp-rag")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "mcp-rag"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir() == Path.home() / ".local" / "share" / "mcp-rag"


# --- where values come from -----------------------------------------------------------------


def test_environment_variables_use_the_mcp_rag_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MCP_RAG_PORT", "9001")
    monkeypatch.setenv("MCP_RAG_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MCP_RAG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("mcp_rag_region", "eu-west")  # names are case-insensitive
    monkeypatch.setenv("PORT", "1234")  # unprefixed: not ours
    s = Settings()
    assert s.port == 9001
    assert s.log_level == "DEBUG"
    assert s.data_dir == tmp_path / "data"
    assert s.region == "eu-west"


def test_dotenv_file_is_read_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    (clean_env / ".env").write_text("MCP_RAG_PORT=9100\nMCP_RAG_REGION=apac\n", encoding="utf-8")
    s = Settings()
    assert (s.port, s.region) == (9100, "apac")
    monkeypatch.setenv("MCP_RAG_PORT", "9200")
    assert Settings().port == 9200


def test_keyword_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_PORT", "9001")
    assert load_settings(port=7000).port == 7000


def test_qdrant_url_selects_the_qdrant_backend() -> None:
    s = Settings(qdrant_url="http://qdrant:6333")
    assert s.index_backend is None
    assert s.resolved_index_backend == "qdrant"
    assert Settings(qdrant_url="http://qdrant:6333", index_backend="embedded").resolved_index_backend == "embedded"


# --- unknown keys -----------------------------------------------------------------------------


def test_unknown_environment_variable_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings ignores unknown prefixed variables on its own; a misspelt one must not pass silently."""
    monkeypatch.setenv("MCP_RAG_BOGUS", "1")
    with pytest.raises(ValidationError):
        Settings()
    message = config_error()
    assert "MCP_RAG_BOGUS: unknown setting" in message


def test_misspelt_setting_in_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_DATABASE_URI", "postgresql://x@h/db")  # _URL is right
    assert "MCP_RAG_DATABASE_URI" in config_error()


def test_reserved_test_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_TEST_PG_BINDIR", "/usr/lib/postgresql/15/bin")
    assert Settings().port == 8000


def test_unknown_key_in_dotenv_is_rejected(clean_env: Path) -> None:
    (clean_env / ".env").write_text("MCP_RAG_PORT=9100\nMCP_RAG_BOGUS=1\n", encoding="utf-8")
    message = config_error()
    assert "MCP_RAG_BOGUS: unknown setting" in message
    assert "MCP_RAG_MCP_RAG" not in message


def test_unknown_keyword_argument_is_rejected() -> None:
    with pytest.raises(ValidationError):
        Settings(bogus=1)  # type: ignore[call-arg]
    assert "BOGUS" in config_error(bogus=1)


# --- actionable messages ------------------------------------------------------------------------


def test_bad_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_DATABASE_URL", "nonsense")
    message = config_error()
    assert "MCP_RAG_DATABASE_URL" in message
    assert "not a valid PostgreSQL DSN" in message
    assert "postgresql://user:pass@host:5432/dbname" in message


def test_read_dsn_needs_a_primary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_DATABASE_READ_URL", "postgresql://u@replica/db")
    message = config_error()
    assert "MCP_RAG_DATABASE_READ_URL needs MCP_RAG_DATABASE_URL" in message


def test_empty_dsn_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_DATABASE_URL", "  ")
    assert Settings().database_url is None


def test_unknown_index_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_INDEX_BACKEND", "foo")
    message = config_error()
    assert "MCP_RAG_INDEX_BACKEND" in message
    assert "'embedded' or 'qdrant'" in message


def test_qdrant_backend_needs_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_INDEX_BACKEND", "qdrant")
    message = config_error()
    assert "MCP_RAG_INDEX_BACKEND is 'qdrant' but MCP_RAG_QDRANT_URL is not set" in message


def test_qdrant_url_needs_a_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_QDRANT_URL", "qdrant:6333")
    message = config_error()
    assert "MCP_RAG_QDRANT_URL" in message
    assert "http://" in message


def test_missing_model_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    monkeypatch.setenv("MCP_RAG_EMBEDDING_MODEL_DIR", str(missing))
    message = config_error()
    assert "MCP_RAG_EMBEDDING_MODEL_DIR" in message
    assert str(missing) in message
    assert "does not exist" in message


def test_bad_api_keys_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_API_KEYS", "[{token: oops}")
    message = config_error()
    assert "MCP_RAG_API_KEYS" in message
    assert "must be a JSON list" in message


def test_api_key_fields_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_API_KEYS", '[{"token": "short", "tenant": "acme"}]')
    message = config_error()
    assert "MCP_RAG_API_KEYS" in message
    assert "at least 16 characters" in message


def test_duplicate_api_key_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    key = {"token": "t" * 20, "tenant": "acme"}
    monkeypatch.setenv("MCP_RAG_API_KEYS", json.dumps([key, {**key, "tenant": "other"}]))
    assert "same token twice" in config_error()


def test_api_keys_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "MCP_RAG_API_KEYS",
        '[{"token": "aaaaaaaaaaaaaaaa1", "tenant": "acme", "scopes": ["read"]},'
        ' {"token": "bbbbbbbbbbbbbbbb2", "tenant": "beta"}]',
    )
    keys = Settings().api_keys
    assert keys == [
        ApiKey(token="aaaaaaaaaaaaaaaa1", tenant="acme", scopes=["read"]),
        ApiKey(token="bbbbbbbbbbbbbbbb2", tenant="beta", scopes=["read", "write"]),
    ]


def test_out_of_range_number_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_CHUNK_TOKENS", "1000")
    message = config_error()
    assert "MCP_RAG_CHUNK_TOKENS" in message
    assert "256" in message


def test_overlap_must_be_smaller_than_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_CHUNK_TOKENS", "64")
    monkeypatch.setenv("MCP_RAG_CHUNK_OVERLAP_TOKENS", "64")
    assert "MCP_RAG_CHUNK_OVERLAP_TOKENS must be smaller than MCP_RAG_CHUNK_TOKENS" in config_error()


def test_every_problem_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_PORT", "0")
    monkeypatch.setenv("MCP_RAG_LOG_FORMAT", "xml")
    message = config_error()
    assert message.startswith("invalid configuration:")
    assert "MCP_RAG_PORT" in message
    assert "MCP_RAG_LOG_FORMAT" in message


# --- lists ---------------------------------------------------------------------------------------


def test_csv_lists_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_ALLOWED_HOSTS", "rag.example.com, svc:*,,")
    monkeypatch.setenv("MCP_RAG_ALLOWED_ORIGINS", "https://a.example.com")
    monkeypatch.setenv("MCP_RAG_URL_ALLOWLIST", '["10.0.0.0/8", "intranet.local"]')  # JSON works too
    s = Settings()
    assert s.allowed_hosts == ["rag.example.com", "svc:*"]
    assert s.allowed_origins == ["https://a.example.com"]
    assert s.url_allowlist == ["10.0.0.0/8", "intranet.local"]


def test_allowed_roots_must_exist_and_are_resolved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("MCP_RAG_ALLOWED_ROOTS", f"{tmp_path}/a/../a,{tmp_path}/b")
    assert Settings().allowed_roots == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    monkeypatch.setenv("MCP_RAG_ALLOWED_ROOTS", f"{tmp_path}/missing")
    message = config_error()
    assert "MCP_RAG_ALLOWED_ROOTS" in message
    assert "does not exist" in message


# --- OAuth resource-server mode ---------------------------------------------------------------


def test_oauth_needs_issuer_and_public_url_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_OAUTH_ISSUER", "https://login.example.com/realms/acme")
    assert "both MCP_RAG_OAUTH_ISSUER" in config_error()
    monkeypatch.setenv("MCP_RAG_PUBLIC_URL", "https://rag.example.com/")
    s = load_settings()
    assert s.oauth_enabled
    assert s.public_url == "https://rag.example.com"  # no trailing slash: the resource is <public_url>/mcp


@pytest.mark.parametrize(
    "url", ["http://login.example.com", "ftp://127.0.0.1", "https://x.example.com/?q=1", "https://u:p@x.example.com"]
)
def test_oauth_urls_must_be_https_except_on_loopback(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("MCP_RAG_PUBLIC_URL", "https://rag.example.com")
    monkeypatch.setenv("MCP_RAG_OAUTH_ISSUER", url)
    assert "MCP_RAG_OAUTH_ISSUER" in config_error()


def test_loopback_http_urls_are_allowed_for_local_testing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_PUBLIC_URL", "http://127.0.0.1:8000")
    monkeypatch.setenv("MCP_RAG_OAUTH_ISSUER", "http://localhost:9000")
    assert load_settings().oauth_enabled


@pytest.mark.parametrize("algorithms", ["none", "HS256", "RS256,HS512", "RS256,none", ""])
def test_jws_algorithms_are_asymmetric_only(monkeypatch: pytest.MonkeyPatch, algorithms: str) -> None:
    monkeypatch.setenv("MCP_RAG_OAUTH_ALGORITHMS", algorithms)
    message = config_error()
    assert "MCP_RAG_OAUTH_ALGORITHMS" in message


def test_introspection_needs_both_credentials_and_an_issuer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_RAG_OAUTH_INTROSPECTION_CLIENT_ID", "mcp-rag")
    assert "MCP_RAG_OAUTH_INTROSPECTION_CLIENT_SECRET" in config_error()
    monkeypatch.setenv("MCP_RAG_OAUTH_INTROSPECTION_CLIENT_SECRET", "s" * 20)
    assert "needs MCP_RAG_OAUTH_ISSUER" in config_error()
