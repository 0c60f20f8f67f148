"""Structure-aware chunking that fits the embedding model's token window.

A document is cut into sections at markdown headings (found by a CommonMark parser, so a
``#`` line inside a code block is no heading, and a heading's path entry is its text as a
reader sees it: escapes resolved, inline markup dropped), or at the section offsets its
extractor found (a PDF's outline), sections into paragraphs, and
paragraphs into sentences; sentences (or word windows of an over-long sentence) are
packed into as few chunks of at most ``max_tokens`` tokens as a section needs, of even size
(the smallest bound that needs no more chunks), each new chunk repeating the last
``overlap_tokens`` worth of sentences of the previous one within a section. Every chunk is
an exact span of the source text: ``text[start:end] == chunk.text``.

A document of one section that fits ``whole_tokens`` (the model's window less its context
line) is one chunk, whatever ``max_tokens`` says: splitting it would only cost embeddings, and
overlap only happens where a split does. Headings still start new chunks (their sections are
what citations point at).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from markdown_it import MarkdownIt
from markdown_it.token import Token

TokenCounter = Callable[[Sequence[str]], list[int]]
Section = tuple[int, tuple[str, ...]]
"""Where a section starts in the text (a character offset) and its heading path."""

_NEWLINE = re.compile(r"\r\n?|\n")  # what markdown-it counts as a line break
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# A closing quote or bracket after the full stop stays with its sentence (up to two of them).
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?…])|(?<=[.!?…][\"')\]])|(?<=[.!?…][\"')\]]{2}))\s+(?=[\"'(\[]?[A-Z0-9À-Ý])|(?<=[\u3002\uff01\uff1f])"
)
_WORD = re.compile(r"\S+")
# A line a top-level heading could be on: an ATX "#" or a setext underline, behind at most three
# spaces. A text without one has no headings, and is not parsed for them.
_HEADING_CANDIDATE = re.compile(r"(?:^|[\r\n])[ ]{0,3}[#=-]")


@dataclass(frozen=True, slots=True)
class Chunk:
    position: int
    text: str
    start: int
    end: int
    heading_path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Unit:
    start: int
    end: int
    heading_path: tuple[str, ...]
    section: int
    paragraph: int


def chunk_text(
    text: str,
    count_tokens: TokenCounter,
    *,
    max_tokens: int = 200,
    overlap_tokens: int = 32,
    markdown: bool = True,
    sections: Sequence[Section] = (),
    whole_tokens: int = 0,
) -> list[Chunk]:
    """Chunks of ``text``. ``sections`` (offsets with heading paths, ascending) takes the place of
    markdown headings when given: an extractor that knows the structure (a PDF outline) says it.
    A text of one section and at most ``whole_tokens`` tokens is one chunk."""
    if max_tokens < 1 or not 0 <= overlap_tokens < max_tokens:
        raise ValueError("need max_tokens >= 1 and 0 <= overlap_tokens < max_tokens")
    units = _units(text, markdown, sections)
    if not units:
        return []
    counts = count_tokens([text[u.start : u.end] for u in units])
    first, last = units[0], units[-1]
    if whole_tokens > 0 and first.section == last.section and sum(counts) <= whole_tokens:
        return [Chunk(0, text[first.start : last.end], first.start, last.end, first.heading_path)]
    units, counts = _split_long(text, units, counts, count_tokens, max_tokens)

    chunks: list[Chunk] = []
    for section in _by_section(units):
        for group in _balanced(section, counts, max_tokens, overlap_tokens):
            first, last = units[group[0]], units[group[-1]]
            chunks.append(Chunk(len(chunks), text[first.start : last.end], first.start, last.end, first.heading_path))
    return chunks


def _by_section(units: Sequence[_Unit]) -> list[list[int]]:
    """Indices of the units, one list per section."""
    sections: list[list[int]] = []
    for i, unit in enumerate(units):
        if not sections or units[sections[-1][-1]].section != unit.section:
            sections.append([])
        sections[-1].append(i)
    return sections


def _balanced(section: list[int], counts: Sequence[int], max_tokens: int, overlap_tokens: int) -> list[list[int]]:
    """The section's units packed into as few chunks as ``max_tokens`` allows, with the smallest
    budget that still needs no more chunks: chunks of even size rather than full ones and a short
    rest (the model's cost follows the longest passage, and a short rest carries little)."""
    groups = _pack(section, counts, max_tokens, overlap_tokens)
    if len(groups) < 2:
        return groups
    best = groups
    low = max(max(counts[i] for i in section), -(-sum(counts[i] for i in section) // len(groups)))
    high = max_tokens
    while low < high:
        budget = (low + high) // 2
        packed = _pack(section, counts, budget, min(overlap_tokens, budget - 1))
        if len(packed) <= len(groups):
            best, high = packed, budget
        else:
            low = budget + 1
    return best


def _pack(section: list[int], counts: Sequence[int], budget: int, overlap_tokens: int) -> list[list[int]]:
    """Greedy packing of a section's units into chunks of at most ``budget`` tokens, each new chunk
    starting with the last ``overlap_tokens`` worth of units of the previous one."""
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in section:
        if current and tokens + counts[i] > budget:
            groups.append(current)
            carried: list[int] = []
            carried_tokens = 0
            for j in reversed(current):
                if carried_tokens + counts[j] > overlap_tokens or carried_tokens + counts[j] + counts[i] > budget:
                    break
                carried.insert(0, j)
                carried_tokens += counts[j]
            current, tokens = carried, carried_tokens
        current.append(i)
        tokens += counts[i]
    if current:
        groups.append(current)
    return groups


def _units(text: str, markdown: bool, given: Sequence[Section] = ()) -> list[_Unit]:
    """Sentences with their heading path, section and paragraph numbers."""
    sections: list[tuple[int, int, tuple[str, ...]]] = []
    cursor = 0
    path: tuple[str, ...] = ()
    boundaries = given if given else markdown_sections(text) if markdown else ()
    for start, heading_path in boundaries:
        start = max(cursor, min(start, len(text)))
        sections.append((cursor, start, path))
        cursor, path = start, tuple(heading_path)  # a heading line belongs to its own section
    sections.append((cursor, len(text), path))

    units: list[_Unit] = []
    paragraph = 0
    for section_no, (start, end, headings) in enumerate(sections):
        for p_start, p_end in _spans(text, start, end, _PARAGRAPH_BREAK):
            paragraph += 1
            for s_start, s_end in _spans(text, p_start, p_end, _SENTENCE_END):
                units.append(_Unit(s_start, s_end, headings, section_no, paragraph))
    return units


Heading = tuple[int, int, str]
"""A heading: where its line starts in the text (a character offset), its level (1-6) and its text."""


@lru_cache(maxsize=2)
def _parser(raw_html: bool) -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": raw_html})


def markdown_headings(text: str, *, raw_html: bool = True) -> list[Heading]:
    """Top-level ATX and setext headings of a markdown text, with their text as a reader sees it.
    ``raw_html=False`` reads ``<tag>`` as text: right for markdown converted from HTML, where such
    text is literal (an option named ``<script>``) and must not open an HTML block."""
    if not _HEADING_CANDIDATE.search(text):
        return []
    line_starts = [0] + [m.end() for m in _NEWLINE.finditer(text)]
    return [
        (line_starts[min(line, len(line_starts) - 1)], level, title)
        for level, line, title in _headings(_parser(raw_html).parse(text))
        if title
    ]


def heading_paths(headings: Sequence[Heading]) -> list[Section]:
    """Sections opened by headings: each heading's path is its text behind the headings above it."""
    out: list[Section] = []
    path: list[tuple[int, str]] = []
    for start, level, title in headings:
        path = [(lvl, t) for lvl, t in path if lvl < level]
        path.append((level, title))
        out.append((start, tuple(t for _, t in path)))
    return out


def markdown_sections(text: str, *, raw_html: bool = True) -> list[Section]:
    """Where each markdown heading starts and the heading path it opens."""
    return heading_paths(markdown_headings(text, raw_html=raw_html))


def heading_text(inline: Token) -> str:
    """What a reader sees of an inline run: text and code, without markup, escapes or raw HTML."""
    parts = [
        child.content
        if child.type in ("text", "code_inline")
        else " "
        if child.type in ("softbreak", "hardbreak")
        else ""
        for child in inline.children or ()
    ]
    return " ".join("".join(parts).split())


def _headings(tokens: list[Token]) -> Iterator[tuple[int, int, str]]:
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and token.level == 0 and token.map is not None and i + 1 < len(tokens):
            yield int(token.tag[1]), token.map[0], heading_text(tokens[i + 1])


def _spans(text: str, start: int, end: int, separator: re.Pattern[str]) -> list[tuple[int, int]]:
    """Non-blank pieces of text[start:end] between separator matches, trimmed of whitespace."""
    pieces = []
    pos = start
    for match in separator.finditer(text, start, end):
        pieces.append((pos, match.start()))
        pos = match.end()
    pieces.append((pos, end))
    out = []
    for a, b in pieces:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            out.append((a, b))
    return out


def _split_long(
    text: str, units: list[_Unit], counts: list[int], count_tokens: TokenCounter, max_tokens: int
) -> tuple[list[_Unit], list[int]]:
    """Cut sentences longer than the window into word windows that fit."""
    if all(c <= max_tokens for c in counts):
        return units, counts
    out_units: list[_Unit] = []
    out_counts: list[int] = []
    for unit, count in zip(units, counts, strict=True):
        if count <= max_tokens:
            out_units.append(unit)
            out_counts.append(count)
            continue
        words = [(m.start(), m.end()) for m in _WORD.finditer(text, unit.start, unit.end)]
        word_counts = count_tokens([text[a:b] for a, b in words])
        window_start, window_tokens = 0, 0
        for k, wc in enumerate(word_counts):
            if k > window_start and window_tokens + wc > max_tokens:
                out_units.append(
                    _Unit(words[window_start][0], words[k - 1][1], unit.heading_path, unit.section, unit.paragraph)
                )
                out_counts.append(window_tokens)
                window_start, window_tokens = k, 0
            window_tokens += wc
        if window_tokens and words:
            out_units.append(
                _Unit(words[window_start][0], words[-1][1], unit.heading_path, unit.section, unit.paragraph)
            )
            out_counts.append(min(window_tokens, max_tokens))
    return out_units, out_counts
