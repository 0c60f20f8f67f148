-- Collections, documents, chunks (with their vectors, so the index can be rebuilt from
-- Postgres alone) and the change log the index follows.

CREATE TABLE collections (
    tenant      text        NOT NULL,
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

CREATE TABLE documents (
    id            uuid        PRIMARY KEY,
    tenant        text        NOT NULL,
    collection    text        NOT NULL,
    source_uri    text        NOT NULL,
    title         text        NOT NULL DEFAULT '',
    metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    content       text        NOT NULL,
    content_hash  text        NOT NULL,
    chunk_count   integer     NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant, collection) REFERENCES collections (tenant, name) ON DELETE CASCADE,
    UNIQUE (tenant, collection, source_uri)
);
CREATE INDEX documents_source_idx ON documents (tenant, source_uri text_pattern_ops);

CREATE TABLE chunks (
    id             bigserial PRIMARY KEY,
    document_id    uuid      NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    position       integer   NOT NULL,
    text           text      NOT NULL,
    start_char     integer   NOT NULL,
    end_char       integer   NOT NULL,
    heading_path   text[]    NOT NULL DEFAULT '{}',
    dense          bytea     NOT NULL,
    sparse_indices integer[] NOT NULL,
    sparse_values  real[]    NOT NULL,
    UNIQUE (document_id, position)
);

-- One row per committed change; the index applies them in seq order. Writers take a
-- transaction-level advisory lock before inserting here, so seq order is commit order.
CREATE TABLE change_log (
    seq          bigserial   PRIMARY KEY,
    tenant       text        NOT NULL,
    collection   text        NOT NULL,
    document_id  uuid,
    op           text        NOT NULL CHECK (op IN ('upsert', 'delete', 'delete_collection')),
    created_at   timestamptz NOT NULL DEFAULT now()
);
