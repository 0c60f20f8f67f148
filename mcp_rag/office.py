"""Office documents, e-books and e-mail as plain documents with their structure as heading paths.

Libraries: python-docx (.docx), python-pptx (.pptx), openpyxl in read-only mode (.xlsx), striprtf (.rtf),
the standard library's ``email`` (.eml), and lxml for the two formats that are a zip of XML the project
reads directly: OpenDocument text (.odt: ``content.xml``) and EPUB (the package's spine of XHTML files,
each extracted like any HTML page).

Protections, before any library sees the file: a zip container must have at most ``MAX_ZIP_MEMBERS``
members, at most ``MAX_UNCOMPRESSED_FACTOR`` times the document limit uncompressed in all (the
sizes the archive declares, which ``zipfile`` also enforces while reading), no member compressed more
than ``MAX_COMPRESSION_RATIO`` to one, no encrypted member, and no XML member may declare entities
(no Office format needs them; a "billion laughs" needs them). python-docx and python-pptx parse with
entity resolution off, openpyxl parses through defusedxml, and the lxml parser here resolves nothing
and loads no DTD. An encrypted Office file (an OLE container, not a zip) or an encrypted OpenDocument
is refused by name. The extracted text counts against the document limit as it grows, so a huge sheet
stops early; a sheet's cells count against ``MAX_SHEET_CELLS`` (empty ones too). Every failure is an
``InvalidInputError`` subclass naming the file.
"""

from __future__ import annotations

import email
import email.policy
import io
import posixpath
import re
import zipfile
from collections.abc import Callable, Iterable
from email.message import EmailMessage
from typing import Any

from .chunking import Section
from .errors import InvalidInputError, TooLargeError, UnsupportedSourceError

OFFICE_SUFFIXES = {
    ".docx": "docx",
    ".pptx": "pptx",
    ".xlsx": "xlsx",
    ".odt": "odt",
    ".epub": "epub",
    ".rtf": "rtf",
    ".eml": "eml",
}
CONTENT_TYPES = {
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "odt": "application/vnd.oasis.opendocument.text",
    "epub": "application/epub+zip",
    "rtf": "application/rtf",
    "eml": "message/rfc822",
}
NAMES = {"docx": "DOCX", "pptx": "PPTX", "xlsx": "XLSX", "odt": "ODT", "epub": "EPUB", "rtf": "RTF", "eml": "e-mail"}

MAX_ZIP_MEMBERS = 10_000
MAX_UNCOMPRESSED_FACTOR = 10
"""Uncompressed size of a container's members in all: at most this many times the document limit (and at
least MIN_UNCOMPRESSED: a blank Word document already expands to most of a megabyte of styles)."""
MIN_UNCOMPRESSED = 32 * 1024 * 1024
MAX_COMPRESSION_RATIO = 200
"""Real Office XML compresses 5-20 to one; a member packed tighter than this (and over 1 MB) is a bomb."""
MAX_SHEET_CELLS = 2_000_000
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_XML_MEMBER = re.compile(r"\.(xml|rels|opf|ncx|xhtml|html?|svg)$", re.IGNORECASE)
_ENTITY = re.compile(rb"<!ENTITY", re.IGNORECASE)

_ODF = {
    "text": "urn:oasis:names:tc:opendocument:xmlns:text:1.0",
    "table": "urn:oasis:names:tc:opendocument:xmlns:table:1.0",
    "office": "urn:oasis:names:tc:opendocument:xmlns:office:1.0",
    "dc": "http://purl.org/dc/elements/1.1/",
    "manifest": "urn:oasis:names:tc:opendocument:xmlns:manifest:1.0",
}


class _Text:
    """Text built paragraph by paragraph, with the heading path each heading opens, counted against the limit."""

    def __init__(self, source_uri: str, max_bytes: int) -> None:
        self.source_uri = source_uri
        self.max_bytes = max_bytes
        self.parts: list[str] = []
        self.size = 0
        self.sections: list[Section] = []
        self.path: list[tuple[int, str]] = []
        self.headings: list[str] = []

    def paragraph(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        self.parts.append(text)
        self.size += len(text) + 2
        if self.size > self.max_bytes:
            raise TooLargeError(f"{self.source_uri}: the extracted text exceeds the limit of {self.max_bytes} bytes")

    def heading(self, level: int, text: str) -> None:
        text = " ".join(text.split())
        if not text:
            return
        self.path = [(lvl, t) for lvl, t in self.path if lvl < level]
        self.path.append((level, text[:300]))
        self.sections.append((self.size, tuple(t for _, t in self.path)))
        self.headings.append(text[:300])
        self.paragraph(text)

    def text(self) -> str:
        return "\n\n".join(self.parts)


def extract_office(data: bytes, *, kind: str, source_uri: str, max_bytes: int) -> Any:
    """One document from the bytes of an office file, e-book or e-mail (``kind`` from ``OFFICE_SUFFIXES``)."""
    from .extract import SourceDocument, _name_of

    name = NAMES[kind]
    if data.startswith(OLE_MAGIC):
        raise UnsupportedSourceError(
            f"{source_uri}: an encrypted (password-protected) or legacy binary Office file, not a {name} file;"
            " remove the password or save it as a current format first"
        )
    out = _Text(source_uri, max_bytes)
    readers: dict[str, Callable[[bytes, _Text], str]] = {
        "docx": _docx,
        "pptx": _pptx,
        "xlsx": _xlsx,
        "odt": _odt,
        "epub": _epub,
        "rtf": _rtf,
        "eml": _eml,
    }
    try:
        if kind in ("docx", "pptx", "xlsx", "odt", "epub"):
            _check_container(data, source_uri, max_bytes, name)
        title = readers[kind](data, out)
    except InvalidInputError:
        raise
    except (MemoryError, RecursionError) as exc:
        raise TooLargeError(f"{source_uri}: the {name} file is too complex to read ({type(exc).__name__})") from None
    except Exception as exc:  # a malformed file surfaces as any error of the library reading it
        raise UnsupportedSourceError(
            f"{source_uri}: malformed or unreadable {name} file ({type(exc).__name__})"
        ) from None
    text = out.text()
    if not text.strip():
        raise InvalidInputError(f"{source_uri}: the {name} file has no text")
    title = " ".join((title or "").split()) or (out.headings[0] if out.headings else "") or _name_of(source_uri)
    return SourceDocument(
        source_uri,
        text,
        title=title[:300],
        metadata={"content_type": CONTENT_TYPES[kind]},
        markdown=False,
        sections=tuple(out.sections) or ((0, (title[:300],)),),
    )


def _check_container(data: bytes, source_uri: str, max_bytes: int, name: str) -> None:
    """Refuse a zip container that is not one, is encrypted, or would expand beyond the limits."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UnsupportedSourceError(f"{source_uri}: not a {name} file (not a readable zip container)") from None
    with archive:
        members = archive.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            raise TooLargeError(f"{source_uri}: {len(members)} archive members exceeds the limit of {MAX_ZIP_MEMBERS}")
        total = sum(m.file_size for m in members)
        limit = max(MAX_UNCOMPRESSED_FACTOR * max_bytes, MIN_UNCOMPRESSED)
        if total > limit:
            raise TooLargeError(
                f"{source_uri}: the {name} file would expand to {total} bytes, over the limit of {limit}"
                " (a zip bomb?); refused"
            )
        for m in members:
            if m.flag_bits & 0x1:
                raise UnsupportedSourceError(f"{source_uri}: the {name} file is encrypted")
            if m.file_size > 1_000_000 and m.file_size > MAX_COMPRESSION_RATIO * max(m.compress_size, 1):
                raise TooLargeError(
                    f"{source_uri}: member {m.filename[:100]!r} is compressed {m.file_size // max(m.compress_size, 1)}"
                    " to one (a zip bomb?); refused"
                )
        for m in members:
            if _XML_MEMBER.search(m.filename) and _ENTITY.search(archive.read(m)):
                raise UnsupportedSourceError(
                    f"{source_uri}: {m.filename[:100]!r} declares XML entities, which {name} files never need; refused"
                )


def _safe_parser() -> Any:
    from lxml import etree

    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


# --- Word ------------------------------------------------------------------------------------------


_HEADING_STYLE = re.compile(r"^heading\s*(\d)$", re.IGNORECASE)


def _docx(data: bytes, out: _Text) -> str:
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    document = docx.Document(io.BytesIO(data))
    for block in document.iter_inner_content():
        if isinstance(block, Paragraph):
            style = (block.style.name if block.style is not None else "") or ""
            match = _HEADING_STYLE.match(style)
            if style.lower() == "title":
                out.heading(1, block.text)
            elif match:
                out.heading(int(match.group(1)) + 1, block.text)
            else:
                out.paragraph(block.text)
        elif isinstance(block, Table):
            out.paragraph(_rows_text([cell.text for cell in row.cells] for row in block.rows))
    return str(document.core_properties.title or "")


# --- PowerPoint -------------------------------------------------------------------------------------


def _pptx(data: bytes, out: _Text) -> str:
    from pptx import Presentation

    deck = Presentation(io.BytesIO(data))
    first_title = ""
    for number, slide in enumerate(deck.slides, start=1):
        title_shape = slide.shapes.title
        title = " ".join((title_shape.text_frame.text if title_shape is not None else "").split())
        first_title = first_title or title
        out.heading(1, f"Slide {number}: {title}" if title else f"Slide {number}")
        for shape in slide.shapes:
            if title_shape is not None and shape.shape_id == title_shape.shape_id:
                continue
            if shape.has_text_frame:
                for paragraph in shape.text_frame.paragraphs:
                    out.paragraph("".join(run.text for run in paragraph.runs))
            if getattr(shape, "has_table", False) and shape.has_table:
                out.paragraph(_rows_text([cell.text for cell in row.cells] for row in shape.table.rows))
        if slide.has_notes_slide and slide.notes_slide.notes_text_frame is not None:
            notes = slide.notes_slide.notes_text_frame.text.strip()
            if notes:
                out.paragraph(f"Notes: {notes}")
    return str(deck.core_properties.title or "") or first_title


# --- Excel ------------------------------------------------------------------------------------------


def _xlsx(data: bytes, out: _Text) -> str:
    import openpyxl  # type: ignore[import-untyped]

    book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        cells = 0
        for sheet in book.worksheets:
            out.heading(1, sheet.title)
            lines: list[str] = []
            for row in sheet.iter_rows(values_only=True):
                cells += len(row)
                if cells > MAX_SHEET_CELLS:
                    raise TooLargeError(
                        f"{out.source_uri}: the workbook has more than {MAX_SHEET_CELLS} cells; split it or export"
                        " the part you need"
                    )
                values = [_cell(v) for v in row]
                while values and not values[-1]:
                    values.pop()
                if values:
                    lines.append(" | ".join(values))
                    out.size += len(lines[-1]) + 1
                    if out.size > out.max_bytes:
                        raise TooLargeError(
                            f"{out.source_uri}: the extracted text exceeds the limit of {out.max_bytes} bytes"
                        )
            out.size -= sum(len(line) + 1 for line in lines)
            out.paragraph("\n".join(lines))
        return str(book.properties.title or "")
    finally:
        book.close()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return " ".join(str(value).split())


def _rows_text(rows: Iterable[list[str]]) -> str:
    lines = []
    for row in rows:
        cells = [" ".join(c.split()) for c in row]
        deduped = [c for i, c in enumerate(cells) if i == 0 or c != cells[i - 1]]  # merged cells repeat
        if any(deduped):
            lines.append(" | ".join(deduped))
    return "\n".join(lines)


# --- OpenDocument text ------------------------------------------------------------------------------


def _odt(data: bytes, out: _Text) -> str:
    from lxml import etree

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = set(archive.namelist())
        if "META-INF/manifest.xml" in names:
            manifest = etree.fromstring(archive.read("META-INF/manifest.xml"), _safe_parser())
            if manifest.find(".//manifest:encryption-data", _ODF) is not None:
                raise UnsupportedSourceError(f"{out.source_uri}: the ODT file is encrypted (password-protected)")
        if "content.xml" not in names:
            raise UnsupportedSourceError(f"{out.source_uri}: not an OpenDocument text file (no content.xml)")
        content = etree.fromstring(archive.read("content.xml"), _safe_parser())
        title = ""
        if "meta.xml" in names:
            meta = etree.fromstring(archive.read("meta.xml"), _safe_parser())
            found = meta.find(".//dc:title", _ODF)
            title = found.text or "" if found is not None else ""
    body = content.find(".//office:body/office:text", _ODF)
    if body is None:
        raise UnsupportedSourceError(f"{out.source_uri}: not an OpenDocument text file (no text body)")
    _odt_blocks(body, out)
    return title


def _ns(prefix: str) -> str:
    return "{" + _ODF[prefix] + "}"


def _odt_blocks(element: Any, out: _Text) -> None:
    text_ns, table_ns = _ns("text"), _ns("table")
    for child in element:
        tag = child.tag if isinstance(child.tag, str) else ""
        if tag == text_ns + "h":
            level = child.get(text_ns + "outline-level") or "1"
            out.heading(int(level) if level.isdigit() and 0 < int(level) < 10 else 1, _odt_text(child))
        elif tag == text_ns + "p":
            out.paragraph(_odt_text(child))
        elif tag == table_ns + "table":
            rows = [
                [_odt_text(cell) for cell in row.iter(table_ns + "table-cell")]
                for row in child.iter(table_ns + "table-row")
            ]
            out.paragraph(_rows_text(rows))
        elif tag in (text_ns + "list", text_ns + "list-item", text_ns + "section", text_ns + "list-header"):
            _odt_blocks(child, out)


def _odt_text(element: Any) -> str:
    """A paragraph's text: spans inline, ``text:s`` as spaces, tabs and line breaks as whitespace."""
    text_ns = _ns("text")
    parts: list[str] = []

    def visit(node: Any) -> None:
        if node.text and node.tag not in (text_ns + "note",):
            parts.append(node.text)
        for child in node:
            tag = child.tag if isinstance(child.tag, str) else ""
            if tag == text_ns + "s":
                parts.append(" ")
            elif tag in (text_ns + "tab", text_ns + "line-break"):
                parts.append("\n" if tag.endswith("line-break") else "\t")
            elif tag != text_ns + "note":  # footnote bodies would interrupt the sentence
                visit(child)
            if child.tail:
                parts.append(child.tail)

    visit(element)
    return "".join(parts)


# --- EPUB -------------------------------------------------------------------------------------------


def _epub(data: bytes, out: _Text) -> str:
    from lxml import etree

    from .extract import _from_html, _html_text

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        container = etree.fromstring(archive.read("META-INF/container.xml"), _safe_parser())
        rootfile = container.find(".//{*}rootfile")
        if rootfile is None or not rootfile.get("full-path"):
            raise UnsupportedSourceError(f"{out.source_uri}: not an EPUB file (no package document)")
        opf_path = str(rootfile.get("full-path"))
        package = etree.fromstring(archive.read(opf_path), _safe_parser())
        found = package.find(".//{http://purl.org/dc/elements/1.1/}title")
        title = (found.text or "") if found is not None else ""
        manifest = {
            item.get("id"): (item.get("href") or "", item.get("media-type") or "")
            for item in package.iterfind(".//{*}manifest/{*}item")
        }
        base = posixpath.dirname(opf_path)
        for ref in package.iterfind(".//{*}spine/{*}itemref"):
            href, media = manifest.get(ref.get("idref"), ("", ""))
            if not href or "html" not in media:
                continue
            member = posixpath.normpath(posixpath.join(base, href.split("#", 1)[0]))
            try:
                raw = archive.read(member)
            except KeyError:
                continue  # a spine entry without its file: skipped, like a reader would
            try:
                chapter = _from_html(_html_text(raw, f"{out.source_uri}#{member}"), out.source_uri)
            except InvalidInputError:
                continue  # a chapter without text (a cover image page)
            offset = out.size - (len(chapter.text) - len(chapter.text.lstrip()))
            for start, path in chapter.sections:
                out.sections.append((max(out.size, offset + start), path))
                out.headings.append(path[-1])
            out.paragraph(chapter.text)
    return title


# --- RTF and e-mail ---------------------------------------------------------------------------------


def _rtf(data: bytes, out: _Text) -> str:
    from striprtf.striprtf import rtf_to_text

    if not data.lstrip().startswith(b"{\\rtf"):
        raise UnsupportedSourceError(f"{out.source_uri}: not an RTF file (no {{\\rtf header)")
    text: str = rtf_to_text(data.decode("latin-1"), errors="replace")  # type: ignore[no-untyped-call]
    for paragraph in re.split(r"\n\s*\n", text):
        out.paragraph(paragraph)
    return ""


def _eml(data: bytes, out: _Text) -> str:
    from .extract import _from_html

    message = email.message_from_bytes(data, policy=email.policy.default)
    if not isinstance(message, EmailMessage) or not message.keys():
        raise UnsupportedSourceError(f"{out.source_uri}: not an e-mail message (no headers)")
    subject = " ".join(str(message.get("subject", "") or "").split())
    out.heading(1, subject or "(no subject)")
    header = [
        f"{name}: {' '.join(str(message.get(name)).split())}"
        for name in ("From", "To", "Cc", "Date")
        if message.get(name)
    ]
    out.paragraph("\n".join(header))
    body = message.get_body(preferencelist=("plain", "html"))
    if body is not None:
        content = body.get_content()
        if not isinstance(content, str):
            raise UnsupportedSourceError(f"{out.source_uri}: the e-mail's body is not text")
        if body.get_content_subtype() == "html":
            page = _from_html(content, out.source_uri)
            offset = out.size - (len(page.text) - len(page.text.lstrip()))
            for start, path in page.sections:
                out.sections.append((max(out.size, offset + start), (out.path[0][1], *path)))
            out.paragraph(page.text)
        else:
            for paragraph in re.split(r"\n\s*\n", content):
                out.paragraph(paragraph)
    attachments = [part.get_filename() for part in message.iter_attachments() if part.get_filename()]
    if attachments:
        out.paragraph("Attachments: " + ", ".join(str(a) for a in attachments))
    return subject
