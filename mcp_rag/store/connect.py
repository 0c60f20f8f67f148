"""What a failed connection to PostgreSQL means for the person who configured it."""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import ConfigurationError, RagError, UnavailableError


def where(dsn: str) -> str:
    """``user@host:port/dbname`` of a DSN, never its password."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(an unparsable URL)"
    host = str(info.get("host") or "localhost")
    if host.startswith("/"):
        host = f"socket {host}"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"{user}{host}{port}/{info.get('dbname') or ''}"


def connect_failure(exc: psycopg.Error | OSError, dsn: str, setting: str = "MCP_RAG_DATABASE_URL") -> RagError:
    """The one-line error for a connection that failed at start-up: a configuration error when the
    server answered and refused (password, database, TLS), unavailable when nothing answered."""
    text = " ".join(str(exc).split())
    target = f"PostgreSQL at {where(dsn)} ({setting})"
    sqlstate = getattr(exc, "sqlstate", None)
    lowered = text.lower()
    if sqlstate == "28P01" or "password authentication failed" in lowered:
        return ConfigurationError(f"{target} refused the password: fix the credentials in {setting}")
    if sqlstate == "3D000" or ("database" in lowered and "does not exist" in lowered):
        return ConfigurationError(f"{target}: the database does not exist; create it or fix the name in {setting}")
    if "no encryption" in lowered or "ssl" in lowered:
        return ConfigurationError(
            f"{target} requires TLS (or refused this TLS setting): add ?sslmode=require to {setting}"
        )
    if sqlstate == "28000" or "no pg_hba.conf entry" in lowered:
        return ConfigurationError(f"{target} does not allow this client (pg_hba.conf): {_detail(text)}")
    return UnavailableError(f"cannot connect to {target}: {_detail(text)}; start it or fix {setting}")


def _detail(text: str) -> str:
    # psycopg repeats the target ("connection failed: connection to server at ... failed: X"): keep X.
    return text.rsplit("failed: ", 1)[-1][:200] if "failed: " in text else text[:200]
