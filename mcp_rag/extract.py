"""Turning sources (inline text, files, directories, BEIR corpora, fetched bytes) into plain documents.

Extraction uses well-kept libraries: html-to-markdown (with lxml to find the main content) for HTML,
pypdf (text, outline, page labels) for PDF, markdown-it-py for markdown headings. Every failure
is an ``InvalidInputError`` subclass whose message says what was wrong with which source.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from .chunking import Heading, Section, heading_paths, markdown_headings, markdown_sections
from .errors import InvalidInputError, TooLargeError, UnsupportedSourceError
from .office import OFFICE_SUFFIXES

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".rst": "text"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
CORPUS_SUFFIXES = {".jsonl"}
SUPPORTED_SUFFIXES = sorted({*TEXT_SUFFIXES, *HTML_SUFFIXES, *PDF_SUFFIXES, *CORPUS_SUFFIXES, *OFFICE_SUFFIXES})

MAX_PDF_PAGES = 2000
PDF_OPERATIONS_PER_BYTE = 8
"""Work budget of PDF text extraction: content-stream operations per byte of the file (at least
MIN_PDF_OPERATIONS, at most MAX_PDF_OPERATIONS). Ordinary PDFs need well under one operation per
byte; a few-KB "bomb" (one highly compressed form XObject drawn thousands of times) needs millions,
each costing pure-Python parsing time, so without a budget it ties up a worker for hours."""
MIN_PDF_OPERATIONS = 250_000
MAX_PDF_OPERATIONS = 5_000_000
MAX_OUTLINE_ENTRIES = 10_000
MAX_HTML_ATTRIBUTES = 256
"""Attributes on one HTML tag. libxml2 (under lxml) compares each new attribute of a tag with
the ones before it, so a single tag with 200k attributes (2 MB) takes hours to extract; real pages
stay far below this."""


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """One document ready to chunk: its identity within a collection, title, text and metadata."""

    source_uri: str
    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    markdown: bool = True
    sections: tuple[Section, ...] = ()
    """Section starts (character offsets into ``text``) with their heading paths, when the extractor knows
    the structure better than the text's markdown headings say it: a PDF's outline, an HTML page's headings
    as the page shows them. Empty: the chunker reads the markdown headings of ``text``."""
    file_stat: tuple[int, int] | None = None
    """(size, mtime in ns) of the file this was read from, set by the folder ingest (sources.read_changed)."""


def decode_text(data: bytes, source: str) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"{source}: not valid UTF-8 (byte {exc.start}); convert the file to UTF-8 text first"
        ) from None
    if "\x00" in text:
        raise UnsupportedSourceError(f"{source}: contains NUL bytes; this looks like a binary file, not text")
    return text


def extract_bytes(data: bytes, *, kind: str, source_uri: str, max_bytes: int) -> SourceDocument:
    """Text of one file or download. ``kind`` is text, markdown, html, pdf or an office kind (office.py)."""
    if len(data) > max_bytes:
        raise TooLargeError(f"{source_uri}: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if kind in ("text", "markdown"):
        text = decode_text(data, source_uri)
        heading = _first_heading(text) if kind == "markdown" else None  # '#' means nothing in plain text
        return SourceDocument(source_uri, text, title=heading or _name_of(source_uri), markdown=kind == "markdown")
    if kind == "html":
        return _from_html(_html_text(data, source_uri), source_uri)
    if kind == "pdf":
        return _from_pdf(data, source_uri, max_bytes)
    if kind in OFFICE_SUFFIXES.values():
        from .office import extract_office  # office.py builds SourceDocuments: imported when first needed

        document: SourceDocument = extract_office(data, kind=kind, source_uri=source_uri, max_bytes=max_bytes)
        return document
    raise UnsupportedSourceError(f"{source_uri}: unsupported content type {kind!r}")


def kind_of_path(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return TEXT_SUFFIXES[suffix]
    if suffix in HTML_SUFFIXES:
        return "html"
    if suffix in PDF_SUFFIXES:
        return "pdf"
    if suffix in CORPUS_SUFFIXES:
        return "corpus"
    if suffix in OFFICE_SUFFIXES:
        return OFFICE_SUFFIXES[suffix]
    raise UnsupportedSourceError(
        f"{path}: unsupported file type {suffix or '(no extension)'!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
    )


def read_file(path: Path, max_bytes: int) -> list[SourceDocument]:
    """Documents in one file (a .jsonl corpus yields many)."""
    kind = kind_of_path(path)
    try:
        size = path.stat().st_size
        if kind != "corpus" and size > max_bytes:
            raise TooLargeError(f"{path}: {size} bytes exceeds the limit of {max_bytes} bytes")
        if kind == "corpus":
            return list(iter_corpus(path, max_bytes))
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return [extract_bytes(data, kind=kind, source_uri=path.resolve().as_uri(), max_bytes=max_bytes)]


def iter_corpus(path: Path, max_bytes: int) -> Iterator[SourceDocument]:
    """A BEIR-style corpus: one JSON object per line with ``_id``, ``title`` and ``text``."""
    base = path.resolve().as_uri()
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if len(raw) > max_bytes:
                raise TooLargeError(f"{path}:{line_no}: record exceeds the limit of {max_bytes} bytes")
            try:
                record = json.loads(decode_text(raw, f"{path}:{line_no}"))
                doc_id = str(record["_id"])
                text = str(record.get("text") or "")
                title = str(record.get("title") or "")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise InvalidInputError(
                    f"{path}:{line_no}: expected a JSON object with '_id', 'title' and 'text'"
                ) from None
            yield SourceDocument(f"{base}#{doc_id}", text, title=title, metadata={"corpus_id": doc_id}, markdown=False)


def walk(paths: Sequence[Path], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Iterator[Path]:
    """Files under ``paths`` (recursively for directories), filtered by globs on the relative path.

    Unsupported file types inside directories are skipped; a file named explicitly is
    always returned (and fails later if unsupported).
    """
    for path in paths:
        if not path.exists():
            raise InvalidInputError(f"{path}: no such file or directory")
        if path.is_file():
            yield path
            continue
        root = path.resolve()
        for candidate in sorted(path.rglob("*")):
            if not candidate.is_file():
                continue
            resolved = candidate.resolve()
            if not resolved.is_relative_to(root):
                continue  # a symlink leading outside the directory
            rel = candidate.relative_to(path).as_posix()
            if include and not any(_glob(rel, g) for g in include):
                continue
            if any(_glob(rel, g) for g in exclude):
                continue
            if candidate.suffix.lower() not in SUPPORTED_SUFFIXES:
                continue
            yield candidate


def _glob(rel: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern)


class _AttributeCounter(HTMLParser):
    """The largest number of attributes on one tag (Python's tokenizer: linear in the input)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.most = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.most = max(self.most, len(attrs))


def _check_html(html: str, source_uri: str) -> None:
    counter = _AttributeCounter()
    try:
        counter.feed(html)
        counter.close()
    except (AssertionError, ValueError, IndexError):
        raise UnsupportedSourceError(f"{source_uri}: malformed HTML") from None
    if counter.most > MAX_HTML_ATTRIBUTES:
        raise TooLargeError(
            f"{source_uri}: an HTML tag has {counter.most} attributes, over the limit of {MAX_HTML_ATTRIBUTES}"
        )


HEADER_LINKS = (
    "a.headerlink",  # Sphinx, MkDocs
    "a.anchor",  # GitHub-rendered README
    "a.hash-link",  # Docusaurus
    "a.anchor-link",  # Jupyter
    "a.md-content__button",  # MkDocs Material "edit this page"
    "a.copiable-anchor",  # texinfo
    "a.copiable-link",  # texinfo
    "a[title^='Permalink']",
    "a[title='Permanent link']",
    "a[aria-label^='Permalink']",
    "[aria-hidden='true']",  # icons and glyphs that screen readers skip too
)
"""Elements generators put into pages for "link to this section" and the like: not what a reader reads."""

LANDMARKS = (
    "nav",
    "[role='navigation']",
    "[role='banner']",
    "[role='contentinfo']",
    "[role='search']",
    "body > header",
    "body > footer",
)
"""Navigation chrome by the page's own markup (HTML sectioning elements and ARIA landmark roles)."""
CHROME_WITHOUT_MAIN: tuple[str, ...] = (
    "aside",  # inside a marked main content an <aside> is a footnote or a sidebar note: content
    "[role='complementary']",
    "#header",
    "#footer",
    "#sidebar",
    "#menu",
    "#breadcrumbs",
    "#toc",  # an in-page table of contents repeats the headings
    ".toc",
    ".header",
    ".footer",
    ".sidebar",
    ".navbar",
    ".menu",
    ".breadcrumb",
    ".breadcrumbs",
    ".skip-link",
)
"""Chrome by the most common names, dropped only from pages that do not mark their main content."""

_MAIN = ("//main", "//*[@role='main']")


def _html_text(raw: bytes, source_uri: str) -> str:
    """The page as text: UTF-8, else the encoding charset-normalizer finds (pages declared latin-1 are common)."""
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes

        best = from_bytes(raw[:65536]).best()
        if best is not None:
            with contextlib.suppress(LookupError, UnicodeDecodeError):
                raw = raw.decode(best.encoding).encode("utf-8")
    return decode_text(raw, source_uri)


def _from_html(html: str, source_uri: str) -> SourceDocument:
    """HTML as markdown: the page's main content (``<main>`` or ``role=main`` when the page marks it,
    else the body) without navigation landmarks, forms and scripts (and, on a page that marks no main
    content, without elements named header, footer, sidebar, menu...), converted by html-to-markdown,
    with header-link glyphs and link targets left out (their text stays). The title is the page's
    ``<title>``, else its first heading."""
    import html_to_markdown
    from lxml import etree
    from lxml import html as lxml_html

    _check_html(html, source_uri)
    try:
        parser = lxml_html.HTMLParser(encoding="utf-8")  # bytes: an XHTML encoding declaration is then no error
        tree = lxml_html.document_fromstring(html.encode("utf-8", "surrogatepass"), parser=parser)
    except (etree.ParserError, ValueError):
        raise InvalidInputError(f"{source_uri}: no readable text found in the HTML") from None
    head_titles = tree.xpath("/html/head/title")  # not an SVG icon's <title> in the body
    page_title = " ".join((head_titles[0].text_content() if head_titles else "").split())
    roots = [found for xpath in _MAIN for found in tree.xpath(xpath)]
    changed = _unwrap_layout_tables(roots[0] if roots else tree) + _drop_heading_anchors(roots[0] if roots else tree)
    if roots:
        content = lxml_html.tostring(roots[0], encoding="unicode")
    else:
        content = lxml_html.tostring(tree, encoding="unicode") if changed else html
    options = html_to_markdown.ConversionOptions(
        preprocessing=html_to_markdown.PreprocessingOptions(preset="standard"),
        exclude_selectors=[*HEADER_LINKS, *LANDMARKS, *(() if roots else CHROME_WITHOUT_MAIN)],
        strip_tags=["a"],
        skip_images=True,
        extract_metadata=False,
        include_document_structure=True,
    )
    try:
        result = html_to_markdown.convert(content, options)
    except html_to_markdown.ConversionError as exc:
        raise UnsupportedSourceError(f"{source_uri}: malformed HTML ({type(exc).__name__})") from None
    text = result.content or ""
    if not text.strip():
        raise InvalidInputError(f"{source_uri}: no readable text found in the HTML")
    headings = _html_headings(markdown_headings(text, raw_html=False), result.document)
    title = page_title or (headings[0][2] if headings else "") or _name_of(source_uri)
    return SourceDocument(
        source_uri,
        text,
        title=title[:300],
        metadata={"content_type": "text/html"},
        sections=tuple(heading_paths(headings)),
    )


_LAYOUT_TABLE = "table[.//table or .//h1 or .//h2 or .//h3 or .//h4 or .//h5 or .//h6 or .//pre]"
_TABLE_PARTS = {"table", "thead", "tbody", "tfoot", "tr", "td", "th", "caption", "colgroup", "col"}


def _unwrap_layout_tables(root: Any) -> int:
    """Turn tables used for page layout (holding headings, code blocks or other tables: old hand-written
    and generated pages) into plain blocks, so their content converts as text and headings rather than
    as one markdown table row. Returns how many tables were unwrapped."""
    tables = set(root.xpath(f"descendant-or-self::{_LAYOUT_TABLE}"))
    if not tables:
        return 0
    parts = [
        element
        for element in root.iter(*_TABLE_PARTS)
        if (element if element.tag == "table" else next(element.iterancestors("table"), None)) in tables
    ]  # decided before any tag changes: a data table inside a layout table stays a table
    for element in parts:
        if element.tag in ("col", "colgroup"):
            element.drop_tree()
        else:
            element.tag = "div"
    return len(tables)


_HEADING_ANCHORS = "descendant-or-self::*[self::h1 or self::h2 or self::h3 or self::h4 or self::h5 or self::h6]//a"
_GLYPHS = {"", "#", "¶", "§", "🔗", "\u200b", "\uf0c1"}


def _drop_heading_anchors(root: Any) -> int:
    """Remove "link to this section" anchors from headings, whatever their class: a link inside a heading
    that points into the page and shows only a glyph (#, ¶, §, 🔗) or nothing. Returns how many."""
    anchors = [
        a
        for a in root.xpath(_HEADING_ANCHORS)
        if (a.get("href") or "").startswith("#") and a.text_content().strip() in _GLYPHS
    ]
    for anchor in anchors:
        anchor.drop_tree()
    return len(anchors)


def _html_headings(found: list[Heading], structure: Any) -> list[Heading]:
    """The markdown's headings titled as the HTML titles them. Markdown made from HTML can read
    differently from the page (``<em>__slots__</em>`` becomes ``*__slots__*``, which markdown reads as
    bold "slots"); the converter's document structure has each heading's text as the page shows it,
    in the same order: a heading takes the next such text with the same words."""
    shown: list[str] = []
    for node in getattr(structure, "nodes", None) or ():
        payload = node.content.heading_payload if node.content.node_type == "heading" else None
        if isinstance(payload, dict) and isinstance(payload.get("text"), str):
            shown.append(" ".join(payload["text"].split()))
    out: list[Heading] = []
    cursor = 0
    for start, level, title in found:
        key = _words(title)
        for i in range(cursor, min(cursor + 8, len(shown))):
            if _words(shown[i]) == key:
                title, cursor = shown[i][:300], i + 1
                break
        out.append((start, level, title))
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def _from_pdf(data: bytes, source_uri: str, max_bytes: int) -> SourceDocument:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    if not data.startswith(b"%PDF-"):
        raise UnsupportedSourceError(f"{source_uri}: not a PDF file (no %PDF- header)")
    budget = min(MAX_PDF_OPERATIONS, max(MIN_PDF_OPERATIONS, PDF_OPERATIONS_PER_BYTE * len(data)))
    operations = 0

    def count_operation(*_: Any) -> None:
        nonlocal operations
        operations += 1
        if operations > budget:
            raise TooLargeError(
                f"{source_uri}: extracting the text needs more than {budget} content operations "
                "(a decompression or repetition bomb?); refused"
            )

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise UnsupportedSourceError(f"{source_uri}: the PDF is encrypted")
        if len(reader.pages) > MAX_PDF_PAGES:
            raise TooLargeError(f"{source_uri}: {len(reader.pages)} pages exceeds the limit of {MAX_PDF_PAGES}")
        pages: list[str] = []
        chars = 0
        prominent = _Prominent()
        for number, page in enumerate(reader.pages):
            visit_text = prominent.visit if number < 2 and not prominent.lines else None
            pages.append(page.extract_text(visitor_operand_before=count_operation, visitor_text=visit_text) or "")
            chars += len(pages[-1].strip())  # a lower bound of the final text's size in bytes
            if chars > max_bytes:  # the document would be refused as too large anyway: stop early
                raise TooLargeError(f"{source_uri}: the PDF's text exceeds the limit of {max_bytes} bytes")
        info_title = reader.metadata.title if reader.metadata else None
        outline = _outline(reader)
        labels = list(reader.page_labels)
    except (
        PyPdfError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        RecursionError,
        MemoryError,
    ) as exc:
        raise UnsupportedSourceError(f"{source_uri}: malformed or unreadable PDF ({type(exc).__name__})") from None
    starts: list[int] = []  # where each page's text starts in the document text
    parts: list[str] = []
    offset = 0
    for page_text in pages:
        starts.append(offset)
        if page_text.strip():
            parts.append(page_text.strip())
            offset += len(parts[-1]) + 2
    text = "\n\n".join(parts)
    if not text:
        raise InvalidInputError(f"{source_uri}: the PDF has no extractable text (scanned images need OCR first)")
    title = " ".join(str(info_title or "").split()) or prominent.title() or (outline[0][2] if outline else "")
    return SourceDocument(
        source_uri,
        text,
        title=(title or _name_of(source_uri))[:300],
        metadata={"content_type": "application/pdf", "pages": len(pages)},
        markdown=False,
        sections=_pdf_sections(text, starts, labels, outline),
    )


class _Prominent:
    """The first page's most prominent text: the run of lines set in its largest font (a title page's
    title). Fed by pypdf's text visitor, which reports each text run with its matrices and font size."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []

    def visit(self, text: str, cm: Sequence[float], tm: Sequence[float], _font: Any, font_size: float) -> None:
        size = abs(font_size) * math.hypot(tm[2], tm[3]) * math.hypot(cm[2], cm[3])
        if text.strip():
            self.lines.append((round(size, 1), text))

    def title(self) -> str:
        if not self.lines:
            return ""
        largest = max(size for size, _ in self.lines)
        if all(size == largest for size, _ in self.lines):
            return ""  # one size throughout: nothing stands out
        first = next(i for i, (size, _) in enumerate(self.lines) if size == largest)
        run = []
        for size, text in self.lines[first:]:
            if size != largest:
                break
            run.append(text)
        title = " ".join("".join(run).split())[:300]
        return title if sum(c.isalnum() for c in title) >= 3 else ""  # a drop cap or an ornament is no title


def _outline(reader: Any) -> list[tuple[int, int, str]]:
    """The PDF's outline (bookmarks) flattened: (depth, page index, title), in reading order."""
    from pypdf.errors import PyPdfError

    out: list[tuple[int, int, str]] = []

    def walk_items(items: Sequence[Any], depth: int) -> None:
        for item in items:
            if isinstance(item, list):
                walk_items(item, depth + 1)
                continue
            title = " ".join(str(getattr(item, "title", "") or "").split())
            try:
                page = reader.get_destination_page_number(item)
            except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError):
                page = None  # a dangling or malformed destination: the entry is skipped
            if title and page is not None and page >= 0:
                out.append((depth, page, title))
            if len(out) >= MAX_OUTLINE_ENTRIES:
                return

    walk_items(reader.outline, 0)
    return out


def _pdf_sections(
    text: str, starts: Sequence[int], labels: Sequence[str], outline: Sequence[tuple[int, int, str]]
) -> tuple[Section, ...]:
    """Heading paths for a PDF's text: each outline entry opens a section where its title appears on its
    page (else at the page's start); text before the first entry, or in a PDF without an outline, is
    headed by its page label ("Page iii")."""
    sections: list[Section] = []
    first_outlined = min((page for _, page, _ in outline), default=len(starts))
    for page in range(min(first_outlined, len(starts))):
        label = labels[page] if page < len(labels) else str(page + 1)
        sections.append((starts[page], (f"Page {label}",)))
    path: list[tuple[int, str]] = []
    cursor = starts[first_outlined] if first_outlined < len(starts) else len(text)
    for depth, page, title in outline:
        page_start = starts[min(page, len(starts) - 1)]
        page_end = starts[page + 1] if page + 1 < len(starts) else len(text)
        at = max(cursor, page_start)
        words = [re.escape(w) for w in title.split()]
        found = re.compile(r"\s*".join(words), re.IGNORECASE).search(text, at, max(at, page_end)) if words else None
        position = found.start() if found else at
        line_start = text.rfind("\n", 0, position) + 1
        position = line_start if line_start >= at else position
        path = [(d, t) for d, t in path if d < depth]
        path.append((depth, title))
        sections.append((position, tuple(t for _, t in path)))
        cursor = position
    return tuple(sorted(sections, key=lambda section: section[0]))


def _first_heading(text: str) -> str | None:
    """The first markdown heading as a reader sees it (no escapes or inline markup)."""
    sections = markdown_sections(text[:20000])
    return sections[0][1][-1][:300] if sections else None


def _name_of(source_uri: str) -> str:
    return source_uri.rstrip("/").rsplit("/", 1)[-1][:300]
