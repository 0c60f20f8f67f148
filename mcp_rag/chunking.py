"""Structure-aware chunking that fits the embedding model's token window.

A document is cut into sections at markdown headings, sections into paragraphs, and
paragraphs into sentences; sentences (or word windows of an over-long sentence) are
packed into chunks of at most ``max_tokens`` tokens, each new chunk repeating the last
``overlap_tokens`` worth of sentences of the previous one within a section. Every chunk is
an exact span of the source text: ``text[start:end] == chunk.text``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TokenCounter = Callable[[Sequence[str]], list[int]]

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
# A closing quote or bracket after the full stop stays with its sentence (up to two of them).
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?…])|(?<=[.!?…][\"')\]])|(?<=[.!?…][\"')\]]{2}))\s+(?=[\"'(\[]?[A-Z0-9À-Ý])|(?<=[\u3002\uff01\uff1f])"
)
_WORD = re.compile(r"\S+")


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
) -> list[Chunk]:
    if max_tokens < 1 or not 0 <= overlap_tokens < max_tokens:
        raise ValueError("need max_tokens >= 1 and 0 <= overlap_tokens < max_tokens")
    units = _units(text, markdown)
    if not units:
        return []
    counts = count_tokens([text[u.start : u.end] for u in units])
    units, counts = _split_long(text, units, counts, count_tokens, max_tokens)

    chunks: list[Chunk] = []
    current: list[int] = []  # indices into units
    tokens = 0

    def emit() -> None:
        first, last = units[current[0]], units[current[-1]]
        chunks.append(Chunk(len(chunks), text[first.start : last.end], first.start, last.end, first.heading_path))

    for i, unit in enumerate(units):
        new_section = bool(current) and units[current[-1]].section != unit.section
        if current and (new_section or tokens + counts[i] > max_tokens):
            emit()
            if new_section:
                current, tokens = [], 0
            else:
                # carry the tail of the previous chunk as overlap
                carried: list[int] = []
                carried_tokens = 0
                for j in reversed(current):
                    if (
                        carried_tokens + counts[j] > overlap_tokens
                        or carried_tokens + counts[j] + counts[i] > max_tokens
                    ):
                        break
                    carried.insert(0, j)
                    carried_tokens += counts[j]
                current, tokens = carried, carried_tokens
        current.append(i)
        tokens += counts[i]
    if current:
        emit()
    return chunks


def _units(text: str, markdown: bool) -> list[_Unit]:
    """Sentences with their heading path, section and paragraph numbers."""
    sections: list[tuple[int, int, tuple[str, ...]]] = []
    path: list[tuple[int, str]] = []
    cursor = 0
    if markdown:
        fenced = _fenced_blocks(text)
        for match in _HEADING.finditer(text):
            if any(start <= match.start() < end for start, end in fenced):
                continue  # a "# comment" line in a code block is not a heading
            sections.append((cursor, match.start(), tuple(title for _, title in path)))
            level = len(match.group(1))
            path = [(lvl, title) for lvl, title in path if lvl < level]
            path.append((level, match.group(2).strip()))
            cursor = match.start()  # the heading line belongs to its own section
    sections.append((cursor, len(text), tuple(title for _, title in path)))

    units: list[_Unit] = []
    paragraph = 0
    for section_no, (start, end, headings) in enumerate(sections):
        for p_start, p_end in _spans(text, start, end, _PARAGRAPH_BREAK):
            paragraph += 1
            for s_start, s_end in _spans(text, p_start, p_end, _SENTENCE_END):
                units.append(_Unit(s_start, s_end, headings, section_no, paragraph))
    return units


def _fenced_blocks(text: str) -> list[tuple[int, int]]:
    """Spans of fenced code blocks: from an opening ``` or ~~~ line to the line closing it (a fence of
    the same character, at least as long, nothing after it) or, unclosed, to the end of the text."""
    blocks: list[tuple[int, int]] = []
    opening: re.Match[str] | None = None
    for match in _FENCE.finditer(text):
        fence = match.group(1)
        if opening is None:
            opening = match
        elif fence[0] == opening.group(1)[0] and len(fence) >= len(opening.group(1)) and not match.group(2).strip():
            blocks.append((opening.start(), match.end()))
            opening = None
    if opening is not None:
        blocks.append((opening.start(), len(text)))
    return blocks


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
