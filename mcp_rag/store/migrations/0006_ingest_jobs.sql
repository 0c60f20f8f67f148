-- Directory ingests that outlive their tool call: the call returns the job's id once it has run
-- past MCP_RAG_INGEST_JOB_AFTER_SECONDS, the ingest goes on in the background, and ingest_status
-- reads this row. A job whose process stopped (heartbeat too old, or interrupted at shutdown) is
-- resumed by the next server: ingesting a directory again is idempotent and skips unchanged files.

CREATE TABLE ingest_jobs (
    id             uuid        PRIMARY KEY,
    tenant         text        NOT NULL,
    collection     text,
    path           text        NOT NULL,
    include        text[]      NOT NULL DEFAULT '{}',
    exclude        text[]      NOT NULL DEFAULT '{}',
    prune          boolean     NOT NULL DEFAULT false,
    status         text        NOT NULL CHECK (status IN ('running', 'interrupted', 'done', 'failed')),
    owner          text,
    attempts       integer     NOT NULL DEFAULT 1,
    done           integer     NOT NULL DEFAULT 0,
    total          integer,
    message        text        NOT NULL DEFAULT '',
    report         jsonb,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ingest_jobs_unfinished_idx ON ingest_jobs (updated_at) WHERE status IN ('running', 'interrupted');
