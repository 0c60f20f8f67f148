"""Chunking: exact spans, the token bound, overlap, sections and heading paths, sentence boundaries.

Pure unit tests count whitespace-separated words as tokens; one test uses the real model tokenizer."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_rag import chunking
from mcp_rag.chunking import Chunk, chunk_text
from mcp_rag.embedding import Embedder


def words(texts: Sequence[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def chunks_of(text: str, *, max_tokens: int = 200, overlap_tokens: int = 0, markdown: bool = True) -> list[Chunk]:
    return chunk_text(text, words, max_tokens=max_tokens, overlap_tokens=overlap_tokens, markdown=markdown)


def assert_well_formed(text: str, chunks: list[Chunk], max_tokens: int) -> None:
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert text[c.start : c.end] == c.text
        assert c.text == c.text.strip()
        assert c.text
        assert len(c.text.split()) <= max_tokens
    covered = [False] * len(text)
    for c in chunks:
        covered[c.start : c.end] = [True] * (c.end - c.start)
    lost = [i for i, ch in enumerate(text) if not ch.isspace() and not covered[i]]
    assert not lost, f"characters in no chunk: {[text[i] for i in lost][:20]}"


def sentence(n: int, word: str = "word") -> str:
    return " ".join([f"{word.capitalize()}{0}"] + [f"{word}{i}" for i in range(1, n)]) + "."


PROSE = " ".join(sentence(5, f"s{k}x") for k in range(12))  # twelve 5-word sentences, one paragraph


# --- basics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t \n", "\r\n\r\n"])
def test_empty_or_blank_text_gives_no_chunks(text: str) -> None:
    assert chunks_of(text) == []


def test_short_text_is_one_chunk() -> None:
    text = "  One short note.  \n"
    [chunk] = chunks_of(text)
    assert chunk.text == "One short note."
    assert (chunk.start, chunk.end) == (2, 17)
    assert chunk.heading_path == ()


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (10, 10), (10, -1), (10, 11)])
def test_invalid_bounds_are_refused(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        chunks_of("Some text.", max_tokens=max_tokens, overlap_tokens=overlap)


# --- spans and the token bound -------------------------------------------------------------------------


def test_spans_are_exact_and_within_the_bound() -> None:
    text = "# Title\n\n" + PROSE + "\n\n" + PROSE.replace("s", "t") + "\n\n## Part\r\n\r\n" + PROSE
    for max_tokens, overlap in [(12, 0), (12, 5), (23, 11), (200, 32)]:
        chunks = chunks_of(text, max_tokens=max_tokens, overlap_tokens=overlap)
        assert_well_formed(text, chunks, max_tokens)


def test_sentences_are_packed_up_to_the_bound() -> None:
    chunks = chunks_of(PROSE, max_tokens=20)
    assert [len(c.text.split()) for c in chunks] == [20, 20, 20]


def test_a_split_section_gets_chunks_of_even_size() -> None:
    """As few chunks as the bound allows, of even size rather than full ones and a short rest: the
    model's cost follows the longest passage of a document, and a short rest carries little."""
    text = " ".join(sentence(10, f"w{k}x") for k in range(10))
    assert [len(c.text.split()) for c in chunks_of(text, max_tokens=80)] == [50, 50]
    # With overlap: greedy packing would give 80 and 10 + 20.
    assert [len(c.text.split()) for c in chunks_of(text, max_tokens=80, overlap_tokens=10)] == [60, 50]
    nine = " ".join(sentence(10, f"w{k}x") for k in range(9))
    assert [len(c.text.split()) for c in chunks_of(nine, max_tokens=40)] == [30, 30, 30]  # not 40, 40, 10
    # Sentences are not cut to even things out: the longest chunk is as short as they allow.
    assert [len(c.text.split()) for c in chunks_of(text, max_tokens=40)] == [40, 40, 20]


def test_sentences_are_never_cut_when_they_fit() -> None:
    sentences = [sentence(n, f"w{k}x") for k, n in enumerate([3, 7, 4, 9, 2, 8, 6, 5, 9, 1])]
    text = " ".join(sentences)
    chunks = chunks_of(text, max_tokens=10, overlap_tokens=3)
    assert_well_formed(text, chunks, 10)
    for c in chunks:
        pieces = re.split(r"(?<=\.) ", c.text)
        assert all(p in sentences for p in pieces), c.text


def test_closing_quotes_stay_with_their_sentence() -> None:
    """Regression: a quote or bracket after the full stop was dropped from the chunk that ended there."""
    text = 'He said "Stop right here." Then everyone left the room. (They went home.) The end came.'
    chunks = chunks_of(text, max_tokens=6)
    assert [c.text for c in chunks] == [
        'He said "Stop right here."',
        "Then everyone left the room.",
        "(They went home.) The end came.",
    ]
    assert_well_formed(text, chunks, 6)


# --- overlap ------------------------------------------------------------------------------------------------


def test_consecutive_chunks_overlap_by_whole_sentences() -> None:
    chunks = chunks_of(PROSE, max_tokens=20, overlap_tokens=6)
    assert len(chunks) > 2
    for prev, nxt in itertools.pairwise(chunks):
        assert nxt.start < prev.end  # shared text
        shared = PROSE[nxt.start : prev.end]
        assert prev.text.endswith(shared)
        assert nxt.text.startswith(shared)
        assert len(shared.split()) == 5  # one 5-word sentence fits the 6-token overlap; two would not
        assert shared.endswith(".")


def test_no_overlap_when_disabled() -> None:
    chunks = chunks_of(PROSE, max_tokens=20, overlap_tokens=0)
    for prev, nxt in itertools.pairwise(chunks):
        assert nxt.start > prev.end


def test_overlap_never_crosses_a_heading() -> None:
    text = "# A\n\n" + PROSE + "\n\n# B\n\n" + PROSE
    chunks = chunks_of(text, max_tokens=20, overlap_tokens=10)
    boundary = text.index("# B")
    for c in chunks:
        assert c.end <= boundary or c.start >= boundary


# --- sections and heading paths ----------------------------------------------------------------------


NESTED = """Preamble before any heading.

# Guide

Intro to the guide.

## Install

How to install it.

### Linux

Use the package manager.

### Mac

Use the installer.

## Usage

Run the command.

# Appendix

Extra notes here.
"""


def test_headings_start_new_chunks_with_their_paths() -> None:
    chunks = chunks_of(NESTED)  # everything would fit in one chunk: only headings split it
    assert_well_formed(NESTED, chunks, 200)
    found = {c.text.splitlines()[-1]: c.heading_path for c in chunks}
    assert found == {
        "Preamble before any heading.": (),
        "Intro to the guide.": ("Guide",),
        "How to install it.": ("Guide", "Install"),
        "Use the package manager.": ("Guide", "Install", "Linux"),
        "Use the installer.": ("Guide", "Install", "Mac"),
        "Run the command.": ("Guide", "Usage"),
        "Extra notes here.": ("Appendix",),
    }
    # the heading line opens its own section's chunk
    assert [c.text.split("\n")[0] for c in chunks[1:]] == [
        "# Guide",
        "## Install",
        "### Linux",
        "### Mac",
        "## Usage",
        "# Appendix",
    ]


def test_heading_variants() -> None:
    text = "## Closed heading ##\nBody one.\n\n#NotAHeading\nBody two.\n\n###### Deep   \nBody three."
    paths = [c.heading_path for c in chunks_of(text)]
    assert paths == [("Closed heading",), ("Closed heading", "Deep")]


def test_hash_lines_in_fenced_code_are_not_headings() -> None:
    text = (
        "# Setup\n\nRun this:\n\n````bash\n# install the package\npip install x\n```\n# still code\n```py\n"
        "# and this\n````\n\n"
        "After the code.\n\n~~~\n## tilde fenced\n~~~\n\n## Next\n\nMore.\n\n```\n# unclosed fence runs to the end"
    )
    chunks = chunks_of(text)
    assert_well_formed(text, chunks, 200)
    assert [c.heading_path for c in chunks] == [("Setup",), ("Setup", "Next")]
    assert all(line in chunks[0].text for line in ("# still code", "# and this", "## tilde fenced"))
    assert chunks[1].text.endswith("# unclosed fence runs to the end")


def test_skipped_levels_keep_the_parent() -> None:
    text = "# Top\n\nA.\n\n### Deep\n\nB.\n\n## Middle\n\nC."
    assert [c.heading_path for c in chunks_of(text)] == [("Top",), ("Top", "Deep"), ("Top", "Middle")]


def test_long_section_chunks_share_the_heading_path() -> None:
    text = "# Big\n\n" + PROSE
    chunks = chunks_of(text, max_tokens=15, overlap_tokens=5)
    assert len(chunks) > 3
    assert {c.heading_path for c in chunks} == {("Big",)}


def test_plain_text_mode_ignores_hashes() -> None:
    text = "# Not a heading\nFirst line.\n\n## Still not\nSecond line."
    chunks = chunks_of(text, markdown=False)
    assert [(c.text, c.heading_path) for c in chunks] == [(text, ())]


# --- over-long sentences ---------------------------------------------------------------------------------


def test_giant_sentence_is_cut_into_word_windows() -> None:
    giant = " ".join(f"w{i}" for i in range(537))  # no full stop anywhere
    text = f"Before it. {giant} after it."
    chunks = chunks_of(text, max_tokens=50, overlap_tokens=0)
    assert_well_formed(text, chunks, 50)
    seen = " ".join(c.text for c in chunks).split()
    assert seen == text.split()  # every word once, in order
    assert all(len(c.text.split()) >= 1 for c in chunks)
    assert max(len(c.text.split()) for c in chunks) == 50


def test_giant_sentence_with_overlap_stays_within_the_bound() -> None:
    text = " ".join(f"w{i}" for i in range(300)) + ". Short tail here."
    chunks = chunks_of(text, max_tokens=40, overlap_tokens=20)
    assert_well_formed(text, chunks, 40)


# --- properties --------------------------------------------------------------------------------------------

_word = st.text(alphabet="abcXYZ019'-", min_size=1, max_size=6)
_sentence = st.builds(
    lambda ws, end: " ".join(ws) + end,
    st.lists(_word, min_size=1, max_size=30),
    st.sampled_from([".", "!", "?", '."', ".)", "", ";"]),
)
_block = st.one_of(
    st.builds(lambda ss: " ".join(ss), st.lists(_sentence, min_size=1, max_size=6)),
    st.builds(lambda level, title: "#" * level + " " + title, st.integers(1, 4), _word),
)


@settings(max_examples=80, deadline=None, database=None)
@given(
    blocks=st.lists(_block, min_size=0, max_size=12),
    separator=st.sampled_from(["\n\n", "\n", "\n \n\t", " "]),
    max_tokens=st.integers(1, 40),
    overlap_ratio=st.floats(0, 0.9),
    markdown=st.booleans(),
)
def test_any_text_is_covered_by_exact_bounded_chunks(
    blocks: list[str], separator: str, max_tokens: int, overlap_ratio: float, markdown: bool
) -> None:
    text = separator.join(blocks)
    overlap = min(int(max_tokens * overlap_ratio), max_tokens - 1)
    chunks = chunks_of(text, max_tokens=max_tokens, overlap_tokens=overlap, markdown=markdown)
    assert_well_formed(text, chunks, max_tokens)
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)


# --- the real tokenizer -------------------------------------------------------------------------------------


LONG_DOC = (
    """# Field notes on river restoration

Rivers that were straightened in the twentieth century lose the pools and riffles fish need. Restoring
meanders slows the water, lets gravel settle, and gives floodwater somewhere to go. In 2019 the project
re-connected 4.2 km of side channels; trout counts doubled within three seasons (see Table 3, p. 41).

## Methods

Each site was surveyed with a differential GNSS receiver (±2 cm) before and after the works. Volunteers
logged water temperature every 15 minutes; loggers were calibrated against a reference thermometer at
0 °C and 25 °C. Sediment samples were dried at 105 °C, sieved through 2 mm, 500 µm and 63 µm meshes, and
weighed to 0.01 g. Questions? E-mail the coordinator at rivers@example.org or call +44 20 7946 0958.

"""
    + "\n\n".join(
        f"Observation {i}: the channel at marker {i * 17} widened by {i % 7 + 1}.{i % 10} m after the spring flood, "
        f"and kingfishers were seen nesting in the new bank on {i % 28 + 1} May. "
        "Willow spiling held where it was planted early; late plantings washed out in the first high water. "
        "Beavers, released upstream in the previous year, built two dams that raised the water table noticeably."
        for i in range(40)
    )
    + "\n\n## One very long sentence\n\n"
    + ", ".join(f"the {i}th tributary feeding the reach with cold spring water and fine silt" for i in range(120))
    + "."
)


def test_real_tokenizer_never_exceeds_the_model_window(embedder: Embedder) -> None:
    chunks = chunk_text(LONG_DOC, embedder.count_tokens, max_tokens=200, overlap_tokens=32)
    assert len(chunks) > 10
    counts = embedder.count_tokens([c.text for c in chunks])
    assert max(counts) <= 200
    assert max(counts) <= 256  # the model's window
    assert min(counts[:-1]) > 0
    for c in chunks:
        assert LONG_DOC[c.start : c.end] == c.text
    assert {c.heading_path for c in chunks} == {
        ("Field notes on river restoration",),
        ("Field notes on river restoration", "Methods"),
        ("Field notes on river restoration", "One very long sentence"),
    }


# --- sections given by the extractor (a PDF outline) ---------------------------------------------------


def test_given_sections_head_the_chunks_instead_of_markdown() -> None:
    text = "Front matter.\n\n# not a heading here\n\nChapter one text. More of it.\n\nSection text follows."
    one, section = text.index("Chapter"), text.index("Section")
    chunks = chunk_text(
        text,
        words,
        max_tokens=50,
        overlap_tokens=0,
        markdown=False,
        sections=[(0, ("Page i",)), (one, ("1 One",)), (section, ("1 One", "1.1 Part"))],
    )
    assert [(c.text, c.heading_path) for c in chunks] == [
        ("Front matter.\n\n# not a heading here", ("Page i",)),
        ("Chapter one text. More of it.", ("1 One",)),
        ("Section text follows.", ("1 One", "1.1 Part")),
    ]


def test_markdown_headings_are_read_by_a_commonmark_parser() -> None:
    text = (
        "# The \\_private\\_ `api_v2`\n\nIntro.\n\n    # indented code\n\n~~~~\n# fenced\n~~~~\n\n"
        "<pre>\n# inside raw html\n</pre>\n\nSetext *title*\n===\n\nBody.\n\n> # quoted heading\n\nEnd."
    )
    paths = {c.heading_path for c in chunks_of(text, max_tokens=5)}
    assert paths == {("The _private_ api_v2",), ("Setext title",)}


# --- whole documents ---------------------------------------------------------------------------------


def test_a_text_that_fits_whole_tokens_is_one_chunk_without_overlap() -> None:
    text = "  " + PROSE + "\n\nA second paragraph. It ends here.\n"  # 60 + 6 words
    [chunk] = chunk_text(text, words, max_tokens=20, overlap_tokens=5, whole_tokens=66)
    assert (chunk.text, chunk.start, chunk.end) == (text.strip(), 2, len(text.rstrip()))
    split = chunk_text(text, words, max_tokens=20, overlap_tokens=5, whole_tokens=65)
    assert split == chunk_text(text, words, max_tokens=20, overlap_tokens=5)  # one token over: cut as before
    assert len(split) > 3


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["# A", "   ## B", "Text.", "===", " ---", "    # code", "\t# tab", "- item", "> # quoted", ""]
        ),
        max_size=8,
    ),
    st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_texts_skipped_by_the_heading_prefilter_have_no_headings(lines: list[str], newline: str) -> None:
    # Only a text with a line a heading could be on is parsed: what the parser finds is still found.
    text = newline.join(lines)
    parsed = [title for _, _, title in chunking._headings(chunking._parser(True).parse(text)) if title]
    assert [title for _, _, title in chunking.markdown_headings(text)] == parsed


def test_headings_still_split_a_text_that_would_fit_whole() -> None:
    text = "# Knots\n\nSailors tie knots.\n\n## Bowline\n\nA fixed loop."
    chunks = chunk_text(text, words, max_tokens=200, overlap_tokens=0, whole_tokens=200)
    assert [c.heading_path for c in chunks] == [("Knots",), ("Knots", "Bowline")]
    [chunk] = chunk_text(
        "# Knots\n\nSailors tie knots. A fixed loop.", words, max_tokens=3, overlap_tokens=0, whole_tokens=200
    )
    assert chunk.heading_path == ("Knots",)
