-- The model identity gains the provider that serves it and a fingerprint: the leading components of
-- the unit vector of a fixed probe text, so another model under the same name (or another build of
-- it) is told apart. Rows claimed before this migration were fastembed's; their fingerprint is
-- filled in by the next process that loads the model.

ALTER TABLE embedding_model
    ADD COLUMN provider    text   NOT NULL DEFAULT 'fastembed',
    ADD COLUMN fingerprint double precision[];
