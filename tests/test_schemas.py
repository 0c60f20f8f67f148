"""The tool outputs built from the service's results (``mcp_rag/schemas.py``)."""

from __future__ import annotations

from dataclasses import asdict

from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_rag.schemas import SearchHit
from mcp_rag.service import SearchResult

metadata_values = st.text(max_size=8) | st.integers(-5, 5) | st.booleans() | st.lists(st.text(max_size=4), max_size=3)


def results(passages: st.SearchStrategy[tuple[SearchResult, ...]]) -> st.SearchStrategy[SearchResult]:
    return st.builds(
        SearchResult,
        chunk_id=st.integers(1, 10**9),
        document_id=st.uuids().map(str),
        collection=st.text(min_size=1, max_size=8),
        source_uri=st.text(max_size=20),
        title=st.text(max_size=20),
        metadata=st.dictionaries(st.text(max_size=6), metadata_values, max_size=3),
        position=st.integers(0, 100),
        text=st.text(max_size=60),
        start_char=st.integers(0, 1000),
        end_char=st.integers(0, 1000),
        heading_path=st.lists(st.text(max_size=8), max_size=3).map(tuple),
        score=st.floats(-1, 1),
        passages=passages,
    )


@settings(max_examples=100, deadline=None)
@given(results(st.lists(results(st.just(())), max_size=3).map(tuple)))
def test_a_hit_carries_every_field_of_its_result(result: SearchResult) -> None:
    """Built field by field, a hit equals what validating the whole result as a dict gives."""
    generic = SearchHit.model_validate({**asdict(result), "id": result.document_id, "url": result.source_uri})
    assert SearchHit.of(result) == generic
    assert SearchHit.of(result).model_dump(mode="json") == generic.model_dump(mode="json")
