-- Size and modification time (nanoseconds) of the file a document was read from, when it was
-- read from a file: a folder ingest skips a file whose size and mtime are unchanged without
-- reading it. NULL for documents from text, URLs and corpora (always read and hashed).

ALTER TABLE documents ADD COLUMN source_size bigint, ADD COLUMN source_mtime_ns bigint;
