"""Extraction quality on real documents found on a Debian machine: titles, heading paths, passage text.

    python -m bench.extraction [--limit-per-class N] [--doc-root /usr/share/doc]

Scores what ``mcp_rag.extract`` + ``mcp_rag.chunking`` make of real pages, by class:

- HTML (Sphinx, MkDocs, hand-written/DocBook/texinfo pages): the truth comes from the page itself, read with
  lxml: the acceptable titles (the ``<title>``, or its part before a site-name separator, or the first ``<h1>``),
  the headings of the main content as a reader sees them (header-link glyphs removed), and its paragraphs. We
  score the title, heading recall and precision (over the set of headings that appear in chunk heading paths),
  paragraph recall (a paragraph counts when its words appear in order in the extracted text), and leaks
  (pilcrows / "Permalink" in text or headings).
- Markdown (Node.js API sources): title and headings against the HTML page Debian ships rendered from them;
  leaks here also count backslash escapes in the title and heading paths.
- PDF: hand-labelled titles of the manuals Debian ships, and the share of text (by characters) whose chunks carry
  a heading path from the PDF's outline.

Pages come from Debian packages (python3-doc, sphinx-doc, mkdocs-doc, zlib1g-dev, libxslt1-dev, valgrind, libffi,
libexpat1-dev, nettle-dev, libtasn1-doc, ...); a class whose pages are absent is skipped, and with no page at all
the benchmark says so in one line and exits 0. Like every benchmark it prints one JSON line per measurement
(here: per class) on stdout; the per-page scores and a markdown table go to stderr.
"""

from __future__ import annotations

import argparse
import gzip
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import html as lxml_html

from bench.common import emit, log
from mcp_rag.chunking import chunk_text
from mcp_rag.extract import SourceDocument, read_file

MAX_BYTES = 50 * 1024 * 1024
DOC = Path("/usr/share/doc")

HTML_CLASSES: dict[str, list[str]] = {
    "sphinx": [
        "python3.11/html/library/os.path.html",
        "python3.11/html/library/json.html",
        "python3.11/html/library/functools.html",
        "python3.11/html/library/re.html",
        "python3.11/html/library/pickle.html",
        "python3.11/html/tutorial/controlflow.html",
        "python3.11/html/tutorial/classes.html",
        "python3.11/html/howto/logging.html",
        "python3.11/html/using/cmdline.html",
        "python3.11/html/reference/datamodel.html",
        "python3.11/html/faq/programming.html",
        "python3/python-policy.html",
        "sphinx-doc/html/usage/quickstart.html",
        "sphinx-doc/html/usage/configuration.html",
        "sphinx-doc/html/tutorial/getting-started.html",
    ],
    "mkdocs": [
        "mkdocs/html/getting-started.html",
        "mkdocs/html/user-guide/writing-your-docs.html",
        "mkdocs/html/user-guide/configuration.html",
        "mkdocs/html/user-guide/deploying-your-docs.html",
        "mkdocs/html/user-guide/installation.html",
        "mkdocs/html/dev-guide/themes.html",
        "mkdocs-literate-nav-doc/html/index.html",
        "mkdocs-literate-nav-doc/html/reference.html",
    ],
    "hand-written": [
        "zlib1g-dev/examples/zlib_how.html",
        "libxslt1-dev/html/tutorial/libxslttutorial.html",
        "libxslt1-dev/html/xsltproc.html",
        "libexpat1-dev/expat.html/reference.html",
        "bzip2/manual.html",
        "time/time.html",
    ],
    "docbook/texinfo": [
        "valgrind/html/quick-start.html",
        "valgrind/html/mc-manual.html",
        "valgrind/html/manual-core.html",
        "libffi8/html/The-Basics.html",
        "libffi8/html/Closure-Example.html",
        "nettle-dev/nettle.html",
        "shared-mime-info/shared-mime-info-spec.html/index.html",
    ],
    "other generators": [
        "nodejs/api/console.html",  # Node.js's own doc tool
        "nodejs/api/dns.html",
        "nodejs/api/events.html",
        "ninja-build/manual.html",  # asciidoc
        "libxslt1-dev/gtk-doc/html/libxslt/libxslt-transform.html",  # gtk-doc
        "libxslt1-dev/html/html/libxslt-transform.html",  # generated, laid out with tables
    ],
}

# Markdown sources whose rendering Debian ships too: the rendered page is the truth for title and headings.
MARKDOWN_PAGES = {
    "nodejs/api/console.md": "nodejs/api/console.html",
    "nodejs/api/dns.md": "nodejs/api/dns.html",
    "nodejs/api/events.md": "nodejs/api/events.html",
    "nodejs/api/fs.md": "nodejs/api/fs.html",
    "nodejs/api/stream.md": "nodejs/api/stream.html",
}

# Acceptable titles of the PDF manuals, read off their first pages by a person.
PDF_TITLES: dict[str, tuple[str, ...]] = {
    "zlib1g-dev/crc-doc.1.0.pdf.gz": ("Everything we know about CRC but afraid to forget",),
    "nettle-dev/nettle.pdf.gz": ("Nettle Manual",),
    "fontconfig/fontconfig-user.pdf.gz": ("fonts-conf", "fonts.conf"),
    "valgrind/valgrind_manual.pdf.gz": ("Valgrind Documentation",),
    "bzip2/manual.pdf.gz": ("bzip2 and libbzip2, version 1.0.8", "bzip2 and libbzip2"),
    "libtasn1-doc/libtasn1.pdf": ("Libtasn1", "GNU Libtasn1"),
    "shared-mime-info/shared-mime-info-spec.pdf": ("Shared MIME-info Database",),
}

# Anchors that generators put into headings for "link to this section": not part of what a reader reads.
_HEADER_LINK = "a[contains(concat(' ', normalize-space(@class), ' '), ' {0} ')]"
_GLYPHS = {"¶", "#", "§", "🔗", "", "\uf0c1"}
_CHROME = ("nav", "header", "footer")
_CHROME_CLASSES = {
    "sphinxsidebar",
    "related",
    "sidebar",
    "bs-sidebar",
    "md-sidebar",
    "md-header",
    "md-footer",
    "navbar",
}
_CHROME_CLASSES |= {"toc", "footer", "modal", "header", "nav-panel", "navheader", "navfooter"}
_SEPARATORS = (" — ", " - ", " | ", " · ", " :: ")
_WORDS = re.compile(r"[A-Za-z0-9]+")
_PILCROW = re.compile(r"[¶]|\bPermalink\b|\S#$")

Extractor = Callable[[Path], SourceDocument]


def _norm(text: str) -> str:
    return " ".join(text.replace("\xa0", " ").split())


def _words(text: str) -> str:
    return " ".join(w.lower() for w in _WORDS.findall(text))


def _squash(text: str) -> str:
    """Letters and digits only: markup that splits a word ("`free`d") does not make a paragraph missing."""
    return "".join(_WORDS.findall(text)).lower()


@dataclass
class Truth:
    titles: set[str]
    headings: list[str]
    paragraphs: list[str] = field(default_factory=list)
    chrome: list[str] = field(default_factory=list)
    """Link texts of navigation chrome (menus, sidebars, footers) whose words the content does not have."""


def _is_chrome(element: Any) -> bool:
    return (
        element.tag in _CHROME
        or element.get("role") in ("navigation", "search", "contentinfo")
        or not _CHROME_CLASSES.isdisjoint((element.get("class") or "").split())
    )


def _in_chrome(element: Any) -> bool:
    return any(_is_chrome(anc) for anc in element.iterancestors())


def html_truth(path: Path) -> Truth:
    """What a reader sees on the page, read with lxml and knowledge of the page's layout."""
    tree = lxml_html.fromstring(path.read_bytes())
    headings = {"h1", "h2", "h3", "h4", "h5", "h6"}
    for anchor in list(tree.iter("a")):
        href = anchor.get("href") or ""
        in_heading = any(anc.tag in headings for anc in anchor.iterancestors())
        if href.startswith("#") and _norm(anchor.text_content()) in _GLYPHS and in_heading:
            anchor.drop_tree()
    titles: set[str] = set()
    page_title = tree.findtext(".//title")
    if page_title and _norm(page_title):
        full = _norm(page_title)
        titles.add(full)
        for sep in _SEPARATORS:
            if sep in full:
                titles.add(full.split(sep)[0].strip())
    headings = [
        _norm(h.text_content())
        for h in tree.iter("h1", "h2", "h3", "h4", "h5", "h6")
        if not _in_chrome(h) and _norm(h.text_content())
    ]
    if headings and tree.find(".//h1") is not None:
        titles.add(_norm(next(tree.iter("h1")).text_content()))
    paragraphs = [
        _norm(p.text_content()) for p in tree.iter("p") if not _in_chrome(p) and len(_norm(p.text_content())) >= 40
    ]
    links = [_norm(a.text_content()) for a in tree.iter("a") if _in_chrome(a)]
    for element in [e for e in tree.iter() if _is_chrome(e) and not _in_chrome(e)]:
        element.drop_tree()
    body = tree.find(".//body")
    content = " " + _words(" ".join(body.itertext()) if body is not None else "") + " "  # blocks apart
    chrome = sorted({t for t in links if len(_words(t).split()) >= 2 and f" {_words(t)} " not in content})
    return Truth(titles, headings, paragraphs, chrome)


def _word_count(texts: Sequence[str]) -> list[int]:
    return [len(t.split()) for t in texts]


def heading_paths(doc: SourceDocument) -> list[tuple[str, ...]]:
    chunks = chunk_text(
        doc.text, _word_count, max_tokens=200, overlap_tokens=0, markdown=doc.markdown, sections=doc.sections
    )
    return [c.heading_path for c in chunks]


@dataclass
class Score:
    cls: str
    page: str
    title: str
    title_ok: bool
    heading_recall: float | None = None
    heading_precision: float | None = None
    paragraph_recall: float | None = None
    leaks: int = 0
    chrome: float | None = None
    covered: float | None = None


def score_html(cls: str, path: Path, extract: Extractor) -> Score:
    truth = html_truth(path)
    doc = extract(path)
    paths = heading_paths(doc)
    found = {h for p in paths for h in p}
    truth_set = set(truth.headings)
    recall = len(truth_set & found) / len(truth_set) if truth_set else None
    precision = len(found & truth_set) / len(found) if found else (None if not truth_set else 0.0)
    text_words = " " + _words(doc.text) + " "
    squashed = _squash(doc.text)
    paras = [p for p in truth.paragraphs if _words(p)]
    para_recall = sum(_squash(p) in squashed for p in paras) / len(paras) if paras else None
    leaks = len(_PILCROW.findall(doc.text)) + sum(len(_PILCROW.findall(h)) for h in found)
    leaks += len(_PILCROW.findall(doc.title))
    chrome = sum(f" {_words(t)} " in text_words for t in truth.chrome) / len(truth.chrome) if truth.chrome else None
    title_ok = _norm(doc.title) in truth.titles
    return Score(cls, str(path), doc.title, title_ok, recall, precision, para_recall, leaks, chrome)


def score_markdown(path: Path, rendered: Path, extract: Extractor) -> Score:
    truth = html_truth(rendered)
    doc = extract(path)
    found = {h for p in heading_paths(doc) for h in p}
    truth_set = set(truth.headings)
    recall = len(truth_set & found) / len(truth_set) if truth_set else None
    precision = len(found & truth_set) / len(found) if found else None
    leaks = sum(len(_PILCROW.findall(h)) + h.count("\\") for h in found) + doc.title.count("\\")
    return Score("markdown", str(path), doc.title, _norm(doc.title) in truth.titles, recall, precision, leaks=leaks)


def score_pdf(path: Path, titles: Sequence[str], extract: Extractor) -> Score:
    doc = extract(path)
    chunks = chunk_text(
        doc.text, _word_count, max_tokens=200, overlap_tokens=0, markdown=doc.markdown, sections=doc.sections
    )
    total = sum(len(c.text) for c in chunks) or 1
    with_outline = sum(len(c.text) for c in chunks if c.heading_path and not c.heading_path[0].startswith("Page "))
    has_outline = any(not path[0].startswith("Page ") for _, path in doc.sections)
    return Score(
        "pdf", str(path), doc.title, _norm(doc.title) in titles, covered=with_outline / total if has_outline else None
    )


def project_extractor(path: Path) -> SourceDocument:
    [doc] = read_file(path, MAX_BYTES)
    return doc


def run(extract: Extractor, limit: int | None = None, doc_root: Path = DOC) -> list[Score]:
    scores: list[Score] = []
    for cls, pages in HTML_CLASSES.items():
        present = [doc_root / p for p in pages if (doc_root / p).is_file()][:limit]
        for page in present:
            scores.append(score_html(cls, page, extract))
    for source, rendered in MARKDOWN_PAGES.items():
        if (doc_root / source).is_file() and (doc_root / rendered).is_file():
            scores.append(score_markdown(doc_root / source, doc_root / rendered, extract))
    with tempfile.TemporaryDirectory() as tmp:
        for name, titles in PDF_TITLES.items():
            src = doc_root / name
            if not src.is_file():
                continue
            if src.suffix == ".gz":
                target = Path(tmp) / src.stem
                target.write_bytes(gzip.decompress(src.read_bytes()))
                src = target
            scores.append(score_pdf(src, titles, extract))
    return scores


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summary(scores: Sequence[Score]) -> list[dict[str, Any]]:
    rows = []
    for cls in dict.fromkeys(s.cls for s in scores):
        mine = [s for s in scores if s.cls == cls]
        rows.append(
            {
                "class": cls,
                "pages": len(mine),
                "title_ok": sum(s.title_ok for s in mine) / len(mine),
                "heading_recall": _mean(s.heading_recall for s in mine),
                "heading_precision": _mean(s.heading_precision for s in mine),
                "paragraph_recall": _mean(s.paragraph_recall for s in mine),
                "leaks": sum(s.leaks for s in mine),
                "chrome_kept": _mean(s.chrome for s in mine),
                "outline_coverage": _mean(s.covered for s in mine),
            }
        )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--limit-per-class", type=int, default=None)
    ap.add_argument(
        "--doc-root", type=Path, default=DOC, help="where the Debian documentation is (default %(default)s)"
    )
    args = ap.parse_args(argv)
    scores = run(project_extractor, args.limit_per_class, args.doc_root)
    if not scores:
        log(
            f"bench.extraction: skipped, none of the real-world pages (Debian documentation packages) is under {args.doc_root}"
        )
        return 0
    for s in scores:
        log(
            f"{s.cls:16} title_ok={s.title_ok!s:5} h_rec={_fmt(s.heading_recall)} h_prec={_fmt(s.heading_precision)} "
            f"para={_fmt(s.paragraph_recall)} leaks={s.leaks} chrome={_fmt(s.chrome)} cov={_fmt(s.covered)} "
            f"{Path(s.page).name} :: {s.title!r}"
        )
    rows = summary(scores)
    for row in rows:
        emit("extraction", f"class={row['class']}", **row)
    cols = list(rows[0])
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(_fmt(row[c]) for c in cols) + " |" for row in rows]
    log("\n" + "\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
