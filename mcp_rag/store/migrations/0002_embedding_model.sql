-- The embedding model the stored vectors belong to: claimed by the first process that opens the
-- database, checked by every later one (vectors of two models are not comparable).

CREATE TABLE embedding_model (
    singleton   boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    name        text        NOT NULL,
    dimension   integer     NOT NULL CHECK (dimension > 0),
    claimed_at  timestamptz NOT NULL DEFAULT now()
);
