"""Passages are batched by length so that padding does not multiply the encoder's work."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from mcp_rag.embedding import Embedder
from mcp_rag.embedding.batching import PADDING_SLACK, length_batches


def test_a_long_chunk_and_its_short_tail_are_embedded_apart() -> None:
    assert length_batches([1200, 150], batch_size=8) == [[0], [1]]


def test_texts_of_similar_length_share_batches_up_to_the_batch_size() -> None:
    lengths = [500, 505, 498, 510, 502, 499, 501, 503, 507, 500]
    batches = length_batches(lengths, batch_size=4)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert batches[0][0] == lengths.index(max(lengths))  # longest first


@given(st.lists(st.integers(0, 5000), max_size=60), st.integers(1, 16))
def test_every_text_once_and_padding_bounded(lengths: list[int], batch_size: int) -> None:
    batches = length_batches(lengths, batch_size)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        sizes = [max(lengths[i], 1) for i in batch]
        if len(batch) > 1:
            assert len(batch) * max(sizes) <= PADDING_SLACK * sum(sizes)


def test_vectors_come_back_in_order_and_as_if_embedded_alone(embedder: Embedder) -> None:
    long_text = "The glacier carved the valley over many thousands of years, " * 20
    texts = ["A short note on tides.", long_text, "Owls hunt at night.", long_text + " Coda.", "Rain."]
    together = embedder.provider.embed_passages(texts)
    for text, vector in zip(texts, together, strict=True):
        [alone] = embedder.provider.embed_passages([text])
        np.testing.assert_allclose(vector, alone, atol=1e-5)
