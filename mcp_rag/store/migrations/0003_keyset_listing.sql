-- list_documents pages in byte order of source_uri (COLLATE "C"), then id: these indexes match
-- that order exactly, so a page is an index range scan (the text_pattern_ops index could not
-- serve ORDER BY source_uri, id) and also serve prefix filters (LIKE 'prefix%' under "C").

CREATE INDEX documents_listing_idx ON documents (tenant, source_uri COLLATE "C", id);
CREATE INDEX documents_collection_listing_idx ON documents (tenant, collection, source_uri COLLATE "C", id);
DROP INDEX documents_source_idx;
