"""Office documents, e-books and e-mail: structure kept as heading paths, hostile files refused per file.

Every fixture is written here by the libraries that write these formats (python-docx, python-pptx,
openpyxl) or by hand as the format's zip of XML (ODT, EPUB), RTF text and an RFC 5322 message."""

from __future__ import annotations

import io
import random
import time
import zipfile
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import docx
import openpyxl
import pytest
from pptx import Presentation
from pptx.util import Inches

from mcp_rag import office
from mcp_rag.errors import InvalidInputError, TooLargeError, UnsupportedSourceError
from mcp_rag.extract import SourceDocument, extract_bytes, read_file

LIMIT = 1_000_000


def section_of(doc: SourceDocument, phrase: str) -> tuple[str, ...]:
    """The heading path of the section the phrase is in."""
    at = doc.text.index(phrase)
    return max((s for s in doc.sections if s[0] <= at), key=lambda s: s[0])[1]


def extract(data: bytes, kind: str, max_bytes: int = LIMIT) -> SourceDocument:
    return extract_bytes(data, kind=kind, source_uri=f"file:///t/doc.{kind}", max_bytes=max_bytes)


# --- fixtures ---------------------------------------------------------------------------------------


def make_docx() -> bytes:
    document = docx.Document()
    document.core_properties.title = "Cellar handbook"
    document.add_heading("Storage", level=1)
    document.add_paragraph("Keep the barrels away from direct sunlight.")
    document.add_heading("Cold rooms", level=2)
    document.add_paragraph("Cold rooms stay at eleven degrees all year.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Room", "Temperature"
    table.cell(1, 0).text, table.cell(1, 1).text = "North", "11 C"
    document.add_heading("Shipping", level=1)
    document.add_paragraph("Pallets leave on Thursdays.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def make_pptx() -> bytes:
    deck = Presentation()
    for title, body in (("Quarterly results", "Revenue rose by twelve percent."), ("Next steps", "Hire two bakers.")):
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = title
        slide.placeholders[1].text = body
    slide.notes_slide.notes_text_frame.text = "Mention the oven budget."
    box = deck.slides[0].shapes.add_textbox(Inches(1), Inches(5), Inches(4), Inches(1))
    box.text_frame.text = "Source: the finance team."
    buffer = io.BytesIO()
    deck.save(buffer)
    return buffer.getvalue()


def make_xlsx(rows: int = 3, filler: str = "") -> bytes:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Inventory"
    sheet.append(["Item", "Count"])
    for i in range(rows):
        sheet.append([f"widget-{i}", i * 2, *([filler] if filler else [])])
    other = book.create_sheet("Suppliers")
    other.append(["Name", "City"])
    other.append(["Acme Flour", "Lyon"])
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


ODT_CONTENT = """<?xml version="1.0" encoding="UTF-8"?>
<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"
  xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0"
  xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" office:version="1.3">
 <office:body><office:text>
  <text:h text:outline-level="1">Garden plan</text:h>
  <text:p>Tomatoes go<text:s/>along the south wall.</text:p>
  <text:h text:outline-level="2">Watering</text:h>
  <text:list><text:list-item><text:p>Water the beans every morning.</text:p></text:list-item></text:list>
  <table:table><table:table-row><table:table-cell><text:p>Bed</text:p></table:table-cell>
   <table:table-cell><text:p>Crop</text:p></table:table-cell></table:table-row></table:table>
 </office:text></office:body>
</office:document-content>"""

ODT_META = """<?xml version="1.0" encoding="UTF-8"?>
<office:document-meta xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0"
  xmlns:dc="http://purl.org/dc/elements/1.1/"><office:meta><dc:title>Allotment notes</dc:title></office:meta>
</office:document-meta>"""

MANIFEST = """<?xml version="1.0" encoding="UTF-8"?>
<manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0">
 <manifest:file-entry manifest:full-path="/" manifest:media-type="application/vnd.oasis.opendocument.text"/>
 <manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml">{encryption}</manifest:file-entry>
</manifest:manifest>"""

ENCRYPTION = '<manifest:encryption-data manifest:checksum-type="SHA1/1K" manifest:checksum="x"/>'


def make_zip(members: dict[str, bytes | str], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def make_odt(encrypted: bool = False) -> bytes:
    return make_zip(
        {
            "mimetype": "application/vnd.oasis.opendocument.text",
            "META-INF/manifest.xml": MANIFEST.format(encryption=ENCRYPTION if encrypted else ""),
            "content.xml": ODT_CONTENT if not encrypted else b"\x8f\x02 encrypted bytes",
            "meta.xml": ODT_META,
        }
    )


def chapter(title: str, heading: str, body: str) -> str:
    return (
        '<?xml version="1.0" encoding="utf-8"?><html xmlns="http://www.w3.org/1999/xhtml">'
        f"<head><title>{title}</title></head><body><h1>{heading}</h1><p>{body}</p></body></html>"
    )


def make_epub() -> bytes:
    container = (
        '<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">'
        '<rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
        "</rootfiles></container>"
    )
    opf = (
        '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0">'
        '<metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>The River Book</dc:title></metadata>'
        '<manifest><item id="c2" href="text/two.xhtml" media-type="application/xhtml+xml"/>'
        '<item id="c1" href="text/one.xhtml" media-type="application/xhtml+xml"/></manifest>'
        '<spine><itemref idref="c1"/><itemref idref="c2"/></spine></package>'
    )
    return make_zip(
        {
            "mimetype": "application/epub+zip",
            "META-INF/container.xml": container,
            "OEBPS/content.opf": opf,
            "OEBPS/text/one.xhtml": chapter("One", "The Source", "The river begins in a mossy spring."),
            "OEBPS/text/two.xhtml": chapter("Two", "The Delta", "It ends in a delta full of herons."),
        }
    )


RTF = rb"""{\rtf1\ansi\deff0{\fonttbl{\f0 Times;}}
{\b Recipe}\par
\par
Mix the flour with caf\'e9 cr\'e8me and bake for twenty minutes.\par
}"""


def make_eml(html: bool = False) -> bytes:
    message = EmailMessage()
    message["Subject"] = "Delivery window for Friday"
    message["From"] = "Dispatch <dispatch@example.com>"
    message["To"] = "shop@example.com"
    message["Date"] = "Fri, 27 Nov 2026 09:00:00 +0000"
    message.set_content("The van arrives between nine and eleven.\n\nPlease keep the loading bay free.")
    if html:
        message.add_alternative(
            "<html><body><h2>Timing</h2><p>The van arrives between nine and eleven.</p></body></html>", subtype="html"
        )
    message.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename="route.pdf")
    return bytes(message)


# --- structure --------------------------------------------------------------------------------------


def test_docx_headings_tables_and_title() -> None:
    doc = extract(make_docx(), "docx")
    assert doc.title == "Cellar handbook"
    assert section_of(doc, "eleven degrees") == ("Storage", "Cold rooms")
    assert section_of(doc, "Thursdays") == ("Shipping",)
    assert "North | 11 C" in doc.text
    assert doc.metadata["content_type"].endswith("wordprocessingml.document")


def test_pptx_slide_titles_bodies_and_notes() -> None:
    doc = extract(make_pptx(), "pptx")
    assert doc.title == "Quarterly results"
    assert section_of(doc, "twelve percent") == ("Slide 1: Quarterly results",)
    assert section_of(doc, "finance team") == ("Slide 1: Quarterly results",)
    assert section_of(doc, "Hire two bakers") == ("Slide 2: Next steps",)
    assert section_of(doc, "oven budget") == ("Slide 2: Next steps",)


def test_xlsx_sheet_names_are_headings() -> None:
    doc = extract(make_xlsx(), "xlsx")
    assert section_of(doc, "widget-2 | 4") == ("Inventory",)
    assert section_of(doc, "Acme Flour | Lyon") == ("Suppliers",)


def test_odt_headings_lists_and_title() -> None:
    doc = extract(make_odt(), "odt")
    assert doc.title == "Allotment notes"
    assert "Tomatoes go along the south wall." in doc.text
    assert section_of(doc, "every morning") == ("Garden plan", "Watering")
    assert "Bed | Crop" in doc.text


def test_epub_chapters_in_spine_order() -> None:
    doc = extract(make_epub(), "epub")
    assert doc.title == "The River Book"
    assert doc.text.index("mossy spring") < doc.text.index("herons")
    assert section_of(doc, "mossy spring") == ("The Source",)
    assert section_of(doc, "herons") == ("The Delta",)


def test_rtf_text() -> None:
    doc = extract(RTF, "rtf")
    assert "café crème" in doc.text
    assert "\\par" not in doc.text


@pytest.mark.parametrize("html", [False, True])
def test_eml_subject_headers_body_and_attachment_names(html: bool) -> None:
    doc = extract(make_eml(html), "eml")
    assert doc.title == "Delivery window for Friday"
    assert "From: Dispatch <dispatch@example.com>" in doc.text
    assert section_of(doc, "between nine and eleven")[0] == "Delivery window for Friday"
    assert "Attachments: route.pdf" in doc.text


def test_files_by_suffix(tmp_path: Path) -> None:
    for name, data in {"a.docx": make_docx(), "b.xlsx": make_xlsx(), "c.eml": make_eml()}.items():
        (tmp_path / name).write_bytes(data)
        [doc] = read_file(tmp_path / name, LIMIT)
        assert doc.source_uri == (tmp_path / name).as_uri()


# --- hostile files ----------------------------------------------------------------------------------


def test_zip_bomb_refused_before_extraction() -> None:
    bomb = make_zip({"[Content_Types].xml": "<Types/>", "word/document.xml": b"\0" * 50_000_000})
    assert len(bomb) < 100_000
    with pytest.raises(TooLargeError, match="zip bomb"):
        extract(bomb, "docx", max_bytes=1_000_000)


def test_too_many_members_refused() -> None:
    many = make_zip({f"x/{i}.xml": "" for i in range(office.MAX_ZIP_MEMBERS + 1)}, zipfile.ZIP_STORED)
    with pytest.raises(TooLargeError, match="archive members"):
        extract(many, "xlsx")


def test_expansion_over_the_limit_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not packed tightly enough to look like a bomb, but more than ten times the document limit in all.
    monkeypatch.setattr(office, "MIN_UNCOMPRESSED", 0)
    words = random.Random(7).choices(["barrel ", "cellar ", "cork ", "vintage "], k=200_000)
    data = make_zip({"word/document.xml": "".join(words)})
    assert len(data) < 100_000
    with pytest.raises(TooLargeError, match="expand"):
        extract(data, "docx", max_bytes=100_000)


def test_xml_entity_expansion_refused() -> None:
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE w [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
        '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><w:document>&c;</w:document>'
    )
    with zipfile.ZipFile(io.BytesIO(make_docx())) as source:
        members: dict[str, bytes | str] = {n: source.read(n) for n in source.namelist()}
    members["word/document.xml"] = laughs
    with pytest.raises(UnsupportedSourceError, match="declares XML entities"):
        extract(make_zip(members), "docx")


def test_encrypted_office_file_refused() -> None:
    # A password-protected DOCX/XLSX/PPTX is an OLE compound file holding the encrypted package.
    encrypted = office.OLE_MAGIC + b"\0" * 4096
    for kind in ("docx", "xlsx", "pptx"):
        with pytest.raises(UnsupportedSourceError, match="encrypted"):
            extract(encrypted, kind)


def test_encrypted_odt_refused() -> None:
    with pytest.raises(UnsupportedSourceError, match="encrypted"):
        extract(make_odt(encrypted=True), "odt")


def test_encrypted_zip_member_refused() -> None:
    data = bytearray(make_odt())
    # Set the "encrypted" flag of every entry in the central directory (the zip writer cannot encrypt).
    at = data.find(b"PK\x01\x02")
    while at != -1:
        data[at + 8] |= 0x1
        at = data.find(b"PK\x01\x02", at + 4)
    with pytest.raises(UnsupportedSourceError, match="encrypted"):
        extract(bytes(data), "odt")


@pytest.mark.parametrize(
    ("kind", "maker"),
    [("docx", make_docx), ("pptx", make_pptx), ("xlsx", make_xlsx), ("odt", make_odt), ("epub", make_epub)],
)
def test_corrupt_files_fail_cleanly(kind: str, maker: Callable[[], bytes]) -> None:
    data = maker()
    with pytest.raises(UnsupportedSourceError, match=r"not a .* file|malformed"):
        extract(data[: len(data) // 2], kind)  # truncated: the zip's directory is gone
    with pytest.raises(UnsupportedSourceError, match=r"not a .* file|malformed"):
        extract(b"plain text, not a zip at all", kind)
    with pytest.raises(InvalidInputError):
        extract(make_zip({"unrelated.txt": "hello"}), kind)  # a zip, but not this format


def test_huge_sheet_stops_at_the_text_limit() -> None:
    data = make_xlsx(rows=20_000, filler="a long shared string repeated in every row " * 5)
    assert len(data) < 400_000  # the file is under the limit; its text (over 4 MB) is not
    started = time.monotonic()
    with pytest.raises(TooLargeError, match="extracted text exceeds"):
        extract(data, "xlsx", max_bytes=400_000)
    assert time.monotonic() - started < 30


def test_too_many_cells_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(office, "MAX_SHEET_CELLS", 1000)
    with pytest.raises(TooLargeError, match="more than 1000 cells"):
        extract(make_xlsx(rows=2000), "xlsx")


def test_text_limit_counts_extracted_text() -> None:
    document = docx.Document()
    for _ in range(200):
        document.add_paragraph("word " * 100)
    buffer = io.BytesIO()
    document.save(buffer)
    data = buffer.getvalue()
    assert len(data) < 60_000  # the file is under the limit; its text is not
    with pytest.raises(TooLargeError, match="extracted text exceeds"):
        extract(data, "docx", max_bytes=60_000)


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("rtf", b"{\\rtf1 " + b"{" * 200_000 + b"deep" + b"}" * 200_000 + b"}"),
        ("rtf", b"not rtf"),
        ("eml", b"\x00\x01\x02 binary"),
        ("eml", b"Subject: empty\n\n"),
    ],
)
def test_hostile_rtf_and_mail_fail_or_finish_quickly(kind: str, data: bytes) -> None:
    started = time.monotonic()
    try:
        doc = extract(data, kind)
    except InvalidInputError as exc:
        assert str(exc).startswith("file:///t/doc.")
    else:
        assert doc.text.strip()
    assert time.monotonic() - started < 10


# --- through the service --------------------------------------------------------------------------


async def test_folder_of_office_files_searchable_with_heading_paths(
    make_settings: Callable[..., Any], embedder: Any, tmp_path: Path
) -> None:
    from mcp_rag.index.qdrant_edge import EdgeIndex
    from mcp_rag.runtime import open_runtime
    from mcp_rag.service import SearchFilters

    folder = tmp_path / "office"
    folder.mkdir()
    (folder / "handbook.docx").write_bytes(make_docx())
    (folder / "deck.pptx").write_bytes(make_pptx())
    (folder / "stock.xlsx").write_bytes(make_xlsx())
    (folder / "garden.odt").write_bytes(make_odt())
    (folder / "river.epub").write_bytes(make_epub())
    (folder / "recipe.rtf").write_bytes(RTF)
    (folder / "delivery.eml").write_bytes(make_eml())
    (folder / "locked.docx").write_bytes(office.OLE_MAGIC + b"\0" * 512)
    settings = make_settings(allowed_roots=[folder])
    async with open_runtime(settings, index=EdgeIndex(tmp_path / "index"), embedder=embedder) as rt:
        report = await rt.service.ingest_path("default", str(folder))
        assert report.added == 7
        assert [f.source for f in report.failed] == [str(folder / "locked.docx")]
        assert "encrypted" in report.failed[0].reason
        hits = await rt.service.search("default", "cold room temperature", filters=SearchFilters(), top_k=3)
        assert hits[0].source_uri.endswith("handbook.docx")
        assert list(hits[0].heading_path) == ["Storage", "Cold rooms"]
        hits = await rt.service.search("default", "Acme Flour supplier", mode="lexical", top_k=1)
        assert list(hits[0].heading_path) == ["Suppliers"]
