"""Extraction: text, markdown, HTML, PDF and BEIR corpora into documents; directory walks; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fpdf import FPDF

from mcp_rag.errors import InvalidInputError, TooLargeError, UnsupportedSourceError
from mcp_rag.extract import extract_bytes, iter_corpus, kind_of_path, read_file, walk

MAX = 1024 * 1024

ARTICLE_HTML = """<!doctype html>
<html><head><title>Tidal Power Explained</title>
<script>var trackingSecret = "script-marker-one";</script></head>
<body>
<nav><a href="/">Home</a> <a href="/about">About us</a> <a href="/contact">Contact page</a></nav>
<article>
<h1>Tidal Power Explained</h1>
<p>Tidal barrages capture the energy of the rising and falling sea. The turbines turn in both directions as
water flows through sluices in the dam.</p>
<p>Unlike wind, the tides are predictable years in advance, which makes tidal generation easy to schedule
on the grid.</p>
</article>
<script>console.log("script-marker-two")</script>
</body></html>
"""


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        if text:
            pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


# --- one file of each kind --------------------------------------------------------------------------


def test_plain_text_file(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.txt", "\ufeffFirst line.\n# not a heading in text mode\nLast line.\n")
    [doc] = read_file(path, MAX)
    assert doc.source_uri == path.resolve().as_uri()
    assert doc.text.startswith("First line.")  # the byte-order mark is gone
    assert doc.title == "notes.txt"  # '#' makes no heading in plain text
    assert doc.markdown is False


def test_markdown_file(tmp_path: Path) -> None:
    text = "Intro.\n\n# Moon Landing\n\nIn 1969 two astronauts walked on the Moon.\n"
    [doc] = read_file(write(tmp_path / "moon.md", text), MAX)
    assert doc.text == text
    assert doc.title == "Moon Landing"
    assert doc.markdown is True
    assert doc.metadata == {}


def test_markdown_without_heading_is_titled_by_file_name(tmp_path: Path) -> None:
    [doc] = read_file(write(tmp_path / "plain.markdown", "Just a paragraph."), MAX)
    assert doc.title == "plain.markdown"


def test_html_file(tmp_path: Path) -> None:
    [doc] = read_file(write(tmp_path / "tidal.html", ARTICLE_HTML), MAX)
    assert doc.title == "Tidal Power Explained"
    assert "Tidal barrages capture the energy" in doc.text
    assert "predictable years in advance" in doc.text
    for dropped in ("script-marker-one", "script-marker-two", "trackingSecret", "About us", "Contact page"):
        assert dropped not in doc.text
    assert doc.metadata == {"content_type": "text/html"}


def test_html_without_readable_text() -> None:
    html = b"<html><head><script>var x = 1;</script></head><body><div>  </div></body></html>"
    with pytest.raises(InvalidInputError, match="no readable text"):
        extract_bytes(html, kind="html", source_uri="https://example.com/empty", max_bytes=MAX)


def test_pdf_file(tmp_path: Path) -> None:
    data = make_pdf(
        ["Glaciers in the Alps have retreated sharply since 1850. Meltwater feeds the rivers in summer.",
         "The second page is about moraines and crevasses."],
        title="Glacier Report",
    )
    [doc] = read_file(write(tmp_path / "glaciers.pdf", data), MAX)
    assert doc.title == "Glacier Report"
    assert "Glaciers in the Alps have retreated sharply since 1850." in doc.text
    assert "moraines and crevasses" in doc.text
    assert doc.text.index("Glaciers") < doc.text.index("moraines")
    assert doc.metadata == {"content_type": "application/pdf", "pages": 2}
    assert doc.markdown is False


def test_pdf_without_title_is_titled_by_file_name(tmp_path: Path) -> None:
    [doc] = read_file(write(tmp_path / "untitled.pdf", make_pdf(["Some body text here."])), MAX)
    assert doc.title == "untitled.pdf"


def test_pdf_without_text_needs_ocr(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no extractable text"):
        read_file(write(tmp_path / "blank.pdf", make_pdf([""])), MAX)


def test_beir_corpus(tmp_path: Path) -> None:
    records = [
        {"_id": "d1", "title": "Volcanoes", "text": "Magma rises through the crust."},
        {"_id": 2, "title": "", "text": "Coral reefs bleach in warm water."},
        {"_id": "d3", "text": "No title at all.", "extra": "ignored"},
    ]
    path = write(tmp_path / "corpus.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    docs = read_file(path, MAX)
    base = path.resolve().as_uri()
    assert [(d.source_uri, d.title, d.text, d.metadata) for d in docs] == [
        (f"{base}#d1", "Volcanoes", "Magma rises through the crust.", {"corpus_id": "d1"}),
        (f"{base}#2", "", "Coral reefs bleach in warm water.", {"corpus_id": "2"}),
        (f"{base}#d3", "", "No title at all.", {"corpus_id": "d3"}),
    ]
    assert all(d.markdown is False for d in docs)


@pytest.mark.parametrize("bad_line", ['{"title": "no id"}', "not json", "[1, 2]", "null", '"a string"'])
def test_beir_corpus_bad_record_names_the_line(tmp_path: Path, bad_line: str) -> None:
    path = write(tmp_path / "corpus.jsonl", json.dumps({"_id": "ok", "text": "fine"}) + "\n" + bad_line + "\n")
    with pytest.raises(InvalidInputError, match=r"corpus\.jsonl:2: expected a JSON object"):
        list(iter_corpus(path, MAX))


def test_beir_corpus_record_over_the_limit(tmp_path: Path) -> None:
    path = write(tmp_path / "corpus.jsonl", json.dumps({"_id": "big", "text": "x" * 500}) + "\n")
    with pytest.raises(TooLargeError, match=r"corpus\.jsonl:1: record exceeds the limit of 100 bytes"):
        read_file(path, 100)


# --- directory walks ----------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write(root / "a.md", "# A\n\nAlpha.")
    write(root / "b.txt", "Beta.")
    write(root / "guide" / "c.md", "# C\n\nGamma.")
    write(root / "guide" / "drafts" / "d.md", "# D\n\nDelta.")
    write(root / "page.html", ARTICLE_HTML)
    write(root / "image.png", b"\x89PNG\r\n\x1a\n")
    write(root / "README", "no extension")
    write(tmp_path / "outside" / "secret.md", "# Secret\n\nOutside the root.")
    (root / "escape.md").symlink_to(tmp_path / "outside" / "secret.md")
    (root / "outdir").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "guide" / "loop").symlink_to(root, target_is_directory=True)
    (root / "alias.md").symlink_to(root / "a.md")  # inside the root: fine
    return root


def rel(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_walk_finds_supported_files_and_stays_inside_the_root(tree: Path) -> None:
    found = rel(list(walk([tree])), tree)
    assert found == ["a.md", "alias.md", "b.txt", "guide/c.md", "guide/drafts/d.md", "page.html"]


def test_walk_include_and_exclude_globs(tree: Path) -> None:
    assert rel(list(walk([tree], include=["*.md"])), tree) == ["a.md", "alias.md", "guide/c.md", "guide/drafts/d.md"]
    assert rel(list(walk([tree], include=["guide/*"])), tree) == ["guide/c.md", "guide/drafts/d.md"]
    assert rel(list(walk([tree], include=["*.md"], exclude=["guide/drafts/*", "alias.md"])), tree) == [
        "a.md", "guide/c.md"
    ]
    assert rel(list(walk([tree], include=["*.md", "*.txt"], exclude=["*.md"])), tree) == ["b.txt"]


def test_walk_returns_named_files_as_they_are(tree: Path) -> None:
    assert list(walk([tree / "README"])) == [tree / "README"]  # and reading it then fails clearly
    with pytest.raises(UnsupportedSourceError, match=r"unsupported file type '\(no extension\)'"):
        read_file(tree / "README", MAX)


def test_walk_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file or directory"):
        list(walk([tmp_path / "nowhere"]))


# --- errors ------------------------------------------------------------------------------------------------


def test_invalid_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.txt", "café crème".encode("latin-1"))
    with pytest.raises(InvalidInputError, match=r"latin1\.txt: not valid UTF-8 \(byte 3\); convert"):
        read_file(path, MAX)


def test_nul_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "binary.md", b"# Title\n\x00\x01\x02 payload")
    with pytest.raises(UnsupportedSourceError, match="contains NUL bytes; this looks like a binary file"):
        read_file(path, MAX)


def test_file_claiming_to_be_a_pdf(tmp_path: Path) -> None:
    path = write(tmp_path / "fake.pdf", "This is plain text wearing a .pdf name.")
    with pytest.raises(UnsupportedSourceError, match=r"not a PDF file \(no %PDF- header\)"):
        read_file(path, MAX)


@pytest.mark.parametrize("cut", ["garbage", "truncated", "binary"])
def test_malformed_pdf(tmp_path: Path, cut: str) -> None:
    good = make_pdf(["Some text that will never be read."])
    data = {
        "garbage": b"%PDF-1.4\nthis is not a pdf body\n%%EOF\n",
        "truncated": good[: len(good) // 2],
        "binary": b"%PDF-1.7\n" + bytes(range(256)) * 4,
    }[cut]
    with pytest.raises(UnsupportedSourceError, match="malformed or unreadable PDF"):
        read_file(write(tmp_path / "broken.pdf", data), MAX)


@pytest.mark.parametrize("name", ["slides.pptx", "archive.tar.gz", "script.py"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "whatever")
    with pytest.raises(UnsupportedSourceError, match=r"unsupported file type .*supported: .*\.md.*\.pdf"):
        read_file(path, MAX)
    with pytest.raises(UnsupportedSourceError):
        kind_of_path(path)


def test_unsupported_content_type() -> None:
    with pytest.raises(UnsupportedSourceError, match="unsupported content type 'docx'"):
        extract_bytes(b"PK\x03\x04", kind="docx", source_uri="https://example.com/a.docx", max_bytes=MAX)


@pytest.mark.parametrize("name", ["big.txt", "big.md", "big.html", "big.pdf"])
def test_oversize_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "x" * 2000)
    with pytest.raises(TooLargeError, match=r"2000 bytes exceeds the limit of 1000 bytes"):
        read_file(path, 1000)


def test_oversize_download() -> None:
    with pytest.raises(TooLargeError, match="exceeds the limit"):
        extract_bytes(b"x" * 11, kind="text", source_uri="https://example.com/t.txt", max_bytes=10)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot read"):
        read_file(tmp_path / "vanished.md", MAX)
