"""bench.extraction: scores generated pages laid out like the Debian documentation tree, and skips in one
line when no page is there."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from fpdf import FPDF

from bench import extraction
from tests.test_extract import HAND_WRITTEN_HTML, MKDOCS_HTML, SPHINX_HTML


def tasn1_like_pdf() -> bytes:
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=30)
    pdf.multi_cell(0, 14, "Libtasn1", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("helvetica", size=12)
    pdf.multi_cell(0, 8, "A library for the GNU system.", new_x="LMARGIN", new_y="NEXT")
    pdf.add_page()
    pdf.start_section("1 Introduction")
    pdf.multi_cell(0, 8, "1 Introduction", new_x="LMARGIN", new_y="NEXT")
    pdf.multi_cell(0, 8, "This document describes the library and its parser. " * 20, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def test_scores_generated_pages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "python3").mkdir()
    (tmp_path / "python3" / "python-policy.html").write_text(SPHINX_HTML, encoding="utf-8")
    (tmp_path / "mkdocs" / "html").mkdir(parents=True)
    (tmp_path / "mkdocs" / "html" / "getting-started.html").write_text(MKDOCS_HTML, encoding="utf-8")
    (tmp_path / "zlib1g-dev" / "examples").mkdir(parents=True)
    (tmp_path / "zlib1g-dev" / "examples" / "zlib_how.html").write_bytes(HAND_WRITTEN_HTML.encode("latin-1"))
    (tmp_path / "libtasn1-doc").mkdir()
    (tmp_path / "libtasn1-doc" / "libtasn1.pdf").write_bytes(tasn1_like_pdf())
    (tmp_path / "nettle-dev").mkdir()
    (tmp_path / "nettle-dev" / "nettle.pdf.gz").write_bytes(gzip.compress(tasn1_like_pdf()))

    assert extraction.main(["--doc-root", str(tmp_path)]) == 0
    rows = {line["class"]: line for line in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"sphinx", "mkdocs", "hand-written", "pdf"}
    for cls in ("sphinx", "mkdocs", "hand-written"):
        row = rows[cls]
        assert (row["pages"], row["title_ok"], row["heading_recall"], row["heading_precision"]) == (1, 1.0, 1.0, 1.0)
        assert row["paragraph_recall"] == 1.0
        assert row["leaks"] == 0
    assert rows["sphinx"]["chrome_kept"] == 0.0
    pdf = rows["pdf"]
    assert pdf["pages"] == 2
    assert pdf["title_ok"] == 0.5  # "Libtasn1" is right for libtasn1.pdf, not for nettle.pdf
    assert pdf["outline_coverage"] > 0.9


def test_skips_in_one_line_without_pages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert extraction.main(["--doc-root", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "skipped" in err
