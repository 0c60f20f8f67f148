"""Extraction: text, markdown, HTML, PDF and BEIR corpora into documents; directory walks; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fpdf import FPDF

from mcp_rag.chunking import Chunk, chunk_text
from mcp_rag.errors import InvalidInputError, TooLargeError, UnsupportedSourceError
from mcp_rag.extract import SourceDocument, extract_bytes, iter_corpus, kind_of_path, read_file, walk

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
        [
            "Glaciers in the Alps have retreated sharply since 1850. Meltwater feeds the rivers in summer.",
            "The second page is about moraines and crevasses.",
        ],
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
        "a.md",
        "guide/c.md",
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


@pytest.mark.parametrize("name", ["slides.ppt", "archive.tar.gz", "script.py"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "whatever")
    with pytest.raises(UnsupportedSourceError, match=r"unsupported file type .*supported: .*\.md.*\.pdf"):
        read_file(path, MAX)
    with pytest.raises(UnsupportedSourceError):
        kind_of_path(path)


def test_unsupported_content_type() -> None:
    with pytest.raises(UnsupportedSourceError, match="unsupported content type 'xls'"):
        extract_bytes(b"PK\x03\x04", kind="xls", source_uri="https://example.com/a.xls", max_bytes=MAX)


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


# --- what a reader sees: titles, heading paths and text of real-world page shapes ----------------------------


def chunks(doc: SourceDocument) -> list[Chunk]:
    return chunk_text(
        doc.text,
        lambda texts: [len(t.split()) for t in texts],
        max_tokens=60,
        overlap_tokens=0,
        markdown=doc.markdown,
        sections=doc.sections,
    )


def path_of(doc: SourceDocument, phrase: str) -> tuple[str, ...]:
    """The heading path of the chunk holding ``phrase``."""
    [hit] = [c for c in chunks(doc) if phrase in c.text][:1]
    return hit.heading_path


def all_paths(doc: SourceDocument) -> set[tuple[str, ...]]:
    return {c.heading_path for c in chunks(doc)}


def html_doc(html: str, uri: str = "https://docs.example.org/page.html") -> SourceDocument:
    return extract_bytes(html.encode(), kind="html", source_uri=uri, max_bytes=MAX)


SPHINX_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8" />
<title>4. Packaged Modules &#8212; Orchard Policy 1.2 documentation</title>
<link rel="stylesheet" href="_static/pygments.css" /></head>
<body>
<div class="related" role="navigation" aria-label="related navigation"><h3>Navigation</h3>
<ul><li><a href="genindex.html" accesskey="I">general index</a></li><li><a href="prev.html">previous chapter</a></li></ul></div>
<div class="document"><div class="documentwrapper"><div class="bodywrapper"><div class="body" role="main">
<section id="abstract"><h1>Abstract<a class="headerlink" href="#abstract" title="Permalink to this heading">\u00b6</a></h1>
<p>This policy describes how orchard tools are packaged.</p></section>
<section id="packaged-modules"><h1><span class="section-number">4. </span>Packaged Modules<a class="headerlink"
 href="#packaged-modules" title="Permalink to this heading">\u00b6</a></h1>
<section id="byte-compilation"><h2><span class="section-number">4.7. </span>Modules Byte-Compilation<a class="headerlink"
 href="#byte-compilation" title="Permalink to this heading">\u00b6</a></h2>
<p>If a binary package provides any binary-independent modules
(<code class="file docutils literal notranslate"><em><span class="pre">foo</span></em><span class="pre">.py</span></code> files),
the corresponding byte-compiled modules
(<code class="file docutils literal notranslate"><em><span class="pre">foo</span></em><span class="pre">.pyc</span></code> files)
and optimized modules (<code class="file docutils literal notranslate"><em><span class="pre">foo</span></em><span class="pre">.pyo</span></code>
files) must not ship in the package. The package&#8217;s <code class="file docutils literal notranslate"><span class="pre">prerm</span></code>
has to make sure that both are removed.</p>
<dl class="py function"><dt class="sig sig-object py" id="orchard.compile">
<span class="sig-name descname"><span class="pre">compile</span></span><span class="sig-paren">(</span><em class="sig-param">path</em><span class="sig-paren">)</span>
<a class="headerlink" href="#orchard.compile" title="Permalink to this definition">\u00b6</a></dt>
<dd><p>Byte-compile every module below the path.</p></dd></dl>
<aside class="footnote-list brackets"><aside class="footnote brackets" id="id7" role="note">
<span class="label"><span class="fn-bracket">[</span><a role="doc-backlink" href="#id1">1</a><span class="fn-bracket">]</span></span>
<p>Optimized modules are no longer produced by current interpreters.</p></aside></aside>
</section></section>
</div></div></div>
<div class="sphinxsidebar" role="navigation" aria-label="main navigation"><div class="sphinxsidebarwrapper">
<h3><a href="index.html">Table of Contents</a></h3><ul><li><a href="#">Sidebar entry about grafting</a></li></ul>
<div id="searchbox" role="search"><h3 id="searchlabel">Quick search</h3><form class="search" action="search.html">
<input type="text" name="q" /><input type="submit" value="Go" /></form></div></div></div></div>
<div class="footer" role="contentinfo">&#169; Copyright 2026, the orchard team. Created using Sphinx.</div>
</body></html>
"""


def test_sphinx_page_title_headings_and_text() -> None:
    doc = html_doc(SPHINX_HTML)
    assert (
        doc.title == "4. Packaged Modules \u2014 Orchard Policy 1.2 documentation"
    )  # the <title>, not "Abstract\u00b6"
    assert path_of(doc, "binary-independent") == ("4. Packaged Modules", "4.7. Modules Byte-Compilation")
    assert path_of(doc, "how orchard tools") == ("Abstract",)
    text = " ".join(doc.text.split())
    # the prose between the inline code spans is all there, and the code reads as code
    assert (
        "(`foo.py` files), the corresponding byte-compiled modules (`foo.pyc` files) and optimized modules "
        "(`foo.pyo` files) must not ship in the package. The package\u2019s `prerm` has to make sure" in text
    )
    assert "Byte-compile every module below the path." in text
    assert "Optimized modules are no longer produced by current interpreters." in text  # a footnote is content
    for chrome in (
        "\u00b6",
        "Permalink",
        "general index",
        "previous chapter",
        "Sidebar entry",
        "Quick search",
        "Copyright",
    ):
        assert chrome not in doc.text
        assert all(chrome not in h for p in all_paths(doc) for h in p)


MKDOCS_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Writing Your Docs - Trellis</title></head>
<body>
<div class="navbar fixed-top navbar-expand-lg navbar-dark bg-primary"><div class="container">
<a class="navbar-brand" href="..">Trellis</a><ul class="nav navbar-nav"><li class="navitem"><a href="../" class="nav-link">Home</a></li>
<li class="dropdown"><a href="#" class="nav-link dropdown-toggle">User Guide</a></li></ul></div></div>
<div class="container"><div class="row">
<div class="col-md-3"><div class="navbar-light navbar-expand-md bs-sidebar hidden-print affix" role="complementary">
<ul class="nav flex-column"><li class="nav-item"><a href="#file-layout" class="nav-link">Sidebar: File layout</a></li></ul></div></div>
<div class="col-md-9" role="main">
<h1 id="writing-your-docs">Writing your docs<a class="headerlink" href="#writing-your-docs" title="Permanent link">&para;</a></h1>
<p>How to lay out and write your Markdown source files.</p>
<h2 id="file-layout">File layout<a class="headerlink" href="#file-layout" title="Permanent link">&para;</a></h2>
<p>Your documentation source should be written as regular Markdown files in the <code>docs_dir</code> directory.</p>
<pre><code class="language-yaml"># a comment line in a YAML example
docs_dir: source
</code></pre>
<h3 id="index-pages">Index pages<a class="headerlink" href="#index-pages" title="Permanent link">&para;</a></h3>
<p>When a directory is requested, by default, most web servers will return an index file.</p>
</div></div></div>
<footer class="col-md-12"><hr><p>Documentation built with Trellis.</p></footer>
</body></html>
"""


def test_mkdocs_page_title_headings_and_text() -> None:
    doc = html_doc(MKDOCS_HTML)
    assert doc.title == "Writing Your Docs - Trellis"
    assert path_of(doc, "regular Markdown files") == ("Writing your docs", "File layout")
    assert path_of(doc, "most web servers") == ("Writing your docs", "File layout", "Index pages")
    assert "in the `docs_dir` directory." in doc.text
    assert "# a comment line in a YAML example" in doc.text  # kept as code ...
    assert all("comment line" not in h for p in all_paths(doc) for h in p)  # ... and never a heading
    for chrome in ("\u00b6", "Sidebar: File layout", "User Guide", "Documentation built with"):
        assert chrome not in doc.text


DOCUSAURUS_HTML = """<!doctype html>
<html lang="en" dir="ltr" class="docs-wrapper"><head><meta charset="UTF-8">
<title data-rh="true">Installation | Canopy</title></head>
<body class="navigation-with-keyboard"><div id="__docusaurus">
<nav aria-label="Main" class="navbar navbar--fixed-top"><div class="navbar__inner"><a class="navbar__brand" href="/">Canopy</a>
<a class="navbar__item navbar__link" href="/blog">Blog link in navbar</a></div></nav>
<div class="main-wrapper"><div class="docsWrapper"><div class="docRoot">
<aside class="theme-doc-sidebar-container"><nav aria-label="Docs sidebar" class="menu thin-scrollbar">
<a class="menu__link" href="/docs/intro">Sidebar intro link</a></nav></aside>
<main class="docMainContainer"><div class="container"><div class="row"><div class="col">
<nav class="theme-doc-breadcrumbs" aria-label="Breadcrumbs"><a href="/">Breadcrumb home</a></nav>
<article><div class="theme-doc-markdown markdown"><header><h1>Installation</h1></header>
<p>Canopy needs a recent runtime and nothing else.</p>
<h2 class="anchor anchorWithStickyNavbar" id="requirements">Requirements<a href="#requirements" class="hash-link"
 aria-label="Direct link to Requirements" title="Direct link to Requirements">&#8203;</a></h2>
<p>Any machine with two cores and a gigabyte of memory runs the canopy daemon comfortably.</p>
</div></article>
<nav class="pagination-nav docusaurus-mt-lg" aria-label="Docs pages"><a class="pagination-nav__link" href="/docs/next">Next page link</a></nav>
</div></div></div></main></div></div></div>
<footer class="footer footer--dark"><div class="footer__copyright">Copyright footer text</div></footer>
</div></body></html>
"""


def test_docusaurus_page_title_headings_and_text() -> None:
    doc = html_doc(DOCUSAURUS_HTML)
    assert doc.title == "Installation | Canopy"
    assert path_of(doc, "two cores") == ("Installation", "Requirements")
    assert "Canopy needs a recent runtime and nothing else." in doc.text
    for chrome in ("\u200b", "Direct link", "Blog link", "Sidebar intro", "Breadcrumb", "Next page link", "Copyright"):
        assert chrome not in doc.text
        assert all(chrome not in h for p in all_paths(doc) for h in p)


GITHUB_README_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>example/rootstock: Grafting toolkit</title></head>
<body><header class="AppHeader"><a href="/features">Product features menu</a></header>
<div class="application-main"><main>
<div id="readme"><article class="markdown-body entry-content container-lg" itemprop="text">
<div class="markdown-heading" dir="auto"><h1 tabindex="-1" class="heading-element" dir="auto">rootstock</h1>
<a id="user-content-rootstock" class="anchor" aria-label="Permalink: rootstock" href="#rootstock"><svg class="octicon
 octicon-link" viewBox="0 0 16 16" width="16" height="16" aria-hidden="true"><path d="M7.775 3.275"></path></svg></a></div>
<p dir="auto">A toolkit for grafting <code>scion_v2</code> branches onto stock trees.</p>
<div class="markdown-heading" dir="auto"><h2 tabindex="-1" class="heading-element" dir="auto">Install the <code>graft_tool</code></h2>
<a id="user-content-install" class="anchor" aria-label="Permalink: Install" href="#install"><svg class="octicon
 octicon-link" aria-hidden="true"><path d="M7.775"></path></svg></a></div>
<div class="highlight highlight-source-shell notranslate position-relative overflow-auto" dir="auto"><pre>pip install rootstock
# then graft
graft --help</pre></div>
<p dir="auto">The tool reads <em>rootstock.toml</em> from the working directory.</p>
</article></div></main></div>
<footer class="footer"><a href="/site/terms">Terms footer link</a></footer></body></html>
"""


def test_github_readme_title_headings_and_text() -> None:
    doc = html_doc(GITHUB_README_HTML)
    assert doc.title == "example/rootstock: Grafting toolkit"
    assert path_of(doc, "reads") == ("rootstock", "Install the graft_tool")  # no backticks, no escapes
    assert "grafting `scion_v2` branches onto stock trees." in doc.text
    assert "pip install rootstock" in doc.text
    assert all("then graft" not in h for p in all_paths(doc) for h in p)
    for chrome in ("Permalink", "Product features", "Terms footer"):
        assert chrome not in doc.text


HAND_WRITTEN_HTML = """<!DOCTYPE html PUBLIC "-//W3C//DTD HTML 4.01 Transitional//EN">
<html><head><meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">
<title>Squeeze Usage Example</title></head>
<body bgcolor="#FFFFFF">
<h2 align="center">Squeeze Usage Example</h2>
<p>We often get questions about how the <tt>deflate()</tt> and <tt>inflate()</tt> functions should be used.
Users wonder when they should provide more input \u00e9l\u00e8ve.</p>
<pre><b>
#include &lt;stdio.h&gt;
#include &lt;string.h&gt;
#if defined(MSDOS) || defined(OS2)
#  define SET_BINARY_MODE(file) setmode(fileno(file), O_BINARY)
#else
#  define SET_BINARY_MODE(file)
#endif
</b></pre>
<h3>Compressing a stream</h3>
<p>The routine reads from <tt>source</tt> until end of file and writes to <tt>dest</tt>.</p>
<hr><i>Copyright (c) 2004 by the author. Last modified 13 October 2026</i>
</body></html>
"""


def test_hand_written_page_code_lines_are_never_headings() -> None:
    doc = extract_bytes(
        HAND_WRITTEN_HTML.encode("latin-1"), kind="html", source_uri="file:///doc/squeeze.html", max_bytes=MAX
    )
    assert doc.title == "Squeeze Usage Example"
    assert "provide more input \u00e9l\u00e8ve." in doc.text  # declared latin-1: decoded, not refused
    assert "#  define SET_BINARY_MODE(file) setmode(fileno(file), O_BINARY)" in doc.text  # verbatim, unescaped
    assert all_paths(doc) <= {("Squeeze Usage Example",), ("Squeeze Usage Example", "Compressing a stream")}
    assert path_of(doc, "end of file") == ("Squeeze Usage Example", "Compressing a stream")
    assert "The routine reads from `source` until end of file and writes to `dest`." in doc.text


def test_markdown_escapes_and_markup_stay_out_of_titles_and_heading_paths(tmp_path: Path) -> None:
    text = (
        "# The \\_private\\_ API of `graft_tool`\n\nIntro.\n\n"
        "## Options for *SET\\_MODE*\n\nSet the mode first.\n\n"
        "    # an indented code line\n\n"
        "```c\n#define SET_BINARY_MODE(file)\n# another\n```\n\nAfter the code.\n\n"
        "Setext heading\n--------------\n\nUnder setext.\n"
    )
    [doc] = read_file(write(tmp_path / "api.md", text), MAX)
    assert doc.title == "The _private_ API of graft_tool"
    assert path_of(doc, "Set the mode") == ("The _private_ API of graft_tool", "Options for SET_MODE")
    assert path_of(doc, "After the code") == ("The _private_ API of graft_tool", "Options for SET_MODE")
    assert path_of(doc, "Under setext") == ("The _private_ API of graft_tool", "Setext heading")
    assert doc.text == text  # markdown is stored as written


def make_manual(*, outline: bool, title: str | None = None, roman_front: bool = False) -> bytes:
    """A small manual: a title page in a large font, then chapters and sections (bookmarked when ``outline``)."""
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.add_page()
    if roman_front:
        pdf.set_page_label(label_style="r")
    pdf.set_font("helvetica", size=28)
    pdf.multi_cell(0, 14, "Orchard Grafting Manual", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("helvetica", size=12)
    pdf.multi_cell(0, 8, "For orchard version 3.1. Written by the orchard team.", new_x="LMARGIN", new_y="NEXT")
    chapters = [
        (
            "1 Introduction",
            [
                ("1.1 Scope", "Grafting joins a scion to a rootstock in spring."),
                ("1.2 Tools", "A sharp knife and tape are all the tools needed."),
            ],
        ),
        (
            "2 Techniques",
            [
                ("2.1 Whip grafting", "Whip grafting suits stems of equal thickness."),
                ("2.2 Cleft grafting", "Cleft grafting places two scions in a split stock."),
            ],
        ),
    ]
    for number, (chapter, sections) in enumerate(chapters):
        pdf.add_page()
        if roman_front and number == 0:
            pdf.set_page_label(label_style="D", label_start=1)
        if outline:
            pdf.start_section(chapter, level=0)
        pdf.set_font("helvetica", size=16)
        pdf.multi_cell(0, 10, chapter, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("helvetica", size=12)
        pdf.multi_cell(0, 8, f"This chapter is called {chapter[2:]}.", new_x="LMARGIN", new_y="NEXT")
        for name, body in sections:
            if outline:
                pdf.start_section(name, level=1)
            pdf.multi_cell(0, 8, name, new_x="LMARGIN", new_y="NEXT")
            pdf.multi_cell(0, 8, body, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def test_pdf_with_outline_gets_heading_paths_and_a_title_from_its_first_page(tmp_path: Path) -> None:
    [doc] = read_file(write(tmp_path / "orchard.pdf", make_manual(outline=True)), MAX)
    assert doc.title == "Orchard Grafting Manual"  # no metadata title: the title page's largest line, not the file name
    assert path_of(doc, "scion to a rootstock") == ("1 Introduction", "1.1 Scope")
    assert path_of(doc, "knife and tape") == ("1 Introduction", "1.2 Tools")
    assert path_of(doc, "This chapter is called Techniques") == ("2 Techniques",)
    assert path_of(doc, "two scions") == ("2 Techniques", "2.2 Cleft grafting")
    assert path_of(doc, "Written by the orchard team") == ("Page 1",)  # before the first bookmark
    assert doc.markdown is False


def test_pdf_metadata_title_wins(tmp_path: Path) -> None:
    [doc] = read_file(write(tmp_path / "orchard.pdf", make_manual(outline=True, title="Grafting, 3rd ed.")), MAX)
    assert doc.title == "Grafting, 3rd ed."


def test_pdf_without_outline_is_headed_by_page_labels(tmp_path: Path) -> None:
    [doc] = read_file(write(tmp_path / "orchard.pdf", make_manual(outline=False, roman_front=True)), MAX)
    assert doc.title == "Orchard Grafting Manual"
    assert path_of(doc, "Written by the orchard team") == ("Page i",)
    assert path_of(doc, "scion to a rootstock") == ("Page 1",)
    assert path_of(doc, "two scions") == ("Page 2",)


def test_html_headings_read_as_the_page_shows_them() -> None:
    html = """<html><head><title>Data model</title></head><body><div role="main">
<h1>3. Data model</h1>
<dl><dt><code>&lt;script&gt;</code></dt><dd><p>Execute the code in <em>script</em>.</p></dd></dl>
<h2>3.1. Notes on using <em>__slots__</em></h2>
<p>Slots save memory per instance.</p>
<h2>3.2. The <code>__init__</code> method and <strong>snake_case</strong> names</h2>
<p>Initialisers run after the instance exists.</p>
</div></body></html>"""
    doc = html_doc(html)
    # markdown reads "*__slots__*" as bold "slots", and a literal "<script>" line as the start of an HTML block
    assert path_of(doc, "save memory") == ("3. Data model", "3.1. Notes on using __slots__")
    assert path_of(doc, "Initialisers") == ("3. Data model", "3.2. The __init__ method and snake_case names")
    assert "<script>" in doc.text


def test_html_without_title_element_is_titled_by_its_first_heading() -> None:
    doc = html_doc("<html><body><h1>Pruning <code>apple_trees</code></h1><p>Cut in late winter.</p></body></html>")
    assert doc.title == "Pruning apple_trees"
    assert path_of(doc, "late winter") == ("Pruning apple_trees",)


def test_page_without_main_content_markup_loses_its_chrome() -> None:
    html = """<html><head><title>Cider Notes</title></head><body>
<div id="header"><a href="/">Home link</a> <a href="/x">Menu item two</a></div>
<div class="sidebar"><ul><li><a href="/a">Sidebar link one</a></li></ul></div>
<div class="content"><h1>Pressing</h1><p>Press the apples within a day of milling them.</p>
<aside>Aside about presses</aside></div>
<div class="footer">Footer text copyright</div><div role="contentinfo">Contentinfo text</div></body></html>"""
    doc = html_doc(html)
    assert doc.title == "Cider Notes"
    assert " ".join(doc.text.split()) == "# Pressing Press the apples within a day of milling them."


def test_marked_main_content_keeps_its_own_header_and_footer_named_blocks() -> None:
    html = """<html><head><title>Cider</title></head><body><nav><a href="/">Site menu link</a></nav>
<main><div class="header"><p>Pressing season opens in September.</p></div><h1>Pressing</h1>
<p>Press the apples within a day of milling them.</p><div class="footer"><p>Read the labels.</p></div></main></body></html>"""
    doc = html_doc(html)
    assert "Pressing season opens in September." in doc.text
    assert "Read the labels." in doc.text
    assert "Site menu" not in doc.text


def test_an_svg_title_in_the_body_is_not_the_page_title() -> None:
    html = """<html><body><svg role="img"><title>Copy icon</title><path d="M0 0"/></svg>
<h1>Grafting basics</h1><p>Join the scion to the stock.</p></body></html>"""
    assert html_doc(html).title == "Grafting basics"


def test_layout_tables_give_headings_not_a_table_row() -> None:
    html = """<html><head><title>Module graft from liborchard</title></head><body>
<table width="100%"><tr><td><table><tr><td align="center"><h1>The orchard C library</h1>
<h2>Module graft from liborchard</h2></td></tr></table></td></tr></table>
<table><tr><td valign="top"><p>This module joins scions to rootstocks.</p>
<h2>Description</h2><h3>Function: graft_join</h3><pre class="programlisting">int graft_join (scion_t *s, stock_t *t);</pre>
<p>Returns zero on success.</p>
<table class="data"><tr><th>name</th><th>meaning</th></tr><tr><td>s</td><td>the scion</td></tr></table>
</td></tr></table></body></html>"""
    doc = html_doc(html)
    assert path_of(doc, "zero on success") == ("The orchard C library", "Description", "Function: graft_join")
    assert "int graft_join (scion_t *s, stock_t *t);" in doc.text
    assert "| s    | the scion |" in doc.text  # a table of data stays a table


def test_section_anchors_inside_headings_go_whatever_their_class() -> None:
    html = """<html><head><title>Console | Runtime docs</title></head><body><div id="column1" role="main">
<h2><span><a class="mark" href="#class-console" id="class-console">#</a></span> Class: <code>Console</code></h2>
<p>The console class writes to any stream.</p>
<h3><a href="#log">console.log()</a><a class="x" href="#log-2">\U0001f517</a></h3><p>Prints to stdout.</p></div></body></html>"""
    doc = html_doc(html)
    assert path_of(doc, "any stream") == ("Class: Console",)
    assert path_of(doc, "Prints to stdout") == ("Class: Console", "console.log()")  # a linked title stays
