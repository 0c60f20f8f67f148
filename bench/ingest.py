"""Ingest efficiency: chunks/s of a real ``mcp-rag ingest`` (CLI subprocess) over the raw fastembed dense
throughput on the same chunk texts with the same batch size and threads, alternated in one run.

    python -m bench.ingest [--quick] [--docs 1000] [--rounds 3]

Each round ingests the first ``--docs`` documents of the dataset (written as one .jsonl) into a
fresh database and index, then (or before: the order alternates) embeds the very texts the ingest
embedded (title + chunk, as the service builds them) with a bare ``fastembed.TextEmbedding``: in
chunk order (``raw``, the baseline of the target) and sorted by length (``raw_sorted``, the order
the embedder batches in since it groups similar lengths to pad less), so ``efficiency_vs_sorted``
isolates what the ingest pipeline itself costs.
A second ``mcp-rag ingest`` of the same file (every document unchanged) measures the fixed cost
of a CLI run (interpreter, imports, model load, connecting), reported separately.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import (
    EXTRA_SETTINGS,
    Postgres,
    check_dataset,
    emit,
    fresh_dir,
    log,
    mcp_rag_command,
    median,
    model_dir,
    parser,
    read_corpus,
    server_env,
    write_subset,
)

BENCH = "ingest"
TARGET = 0.90


def chunk_texts(dsn: str, model: Path, scratch: Path) -> list[str]:
    """The texts the ingest embedded, in chunk order (see ``service.passage_texts``)."""
    import psycopg

    from mcp_rag.embedding import Embedder
    from mcp_rag.extract import SourceDocument
    from mcp_rag.service import passage_texts
    from mcp_rag.settings import Settings

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT d.title, c.heading_path, c.text FROM chunks c"
            " JOIN documents d ON d.id = c.document_id ORDER BY c.id"
        ).fetchall()
    settings = Settings(
        data_dir=scratch,
        embedding_model_dir=model,
        _env_file=None,  # type: ignore[call-arg]
        **{k: v for k, v in EXTRA_SETTINGS.items() if k.startswith("chunk_")},
    )
    items = [(SourceDocument("x", "x", title=r[0]), r[1], r[2]) for r in rows]
    return passage_texts(Embedder(settings), settings.chunk_tokens, items)


def run_cli_ingest(env: dict[str, str], corpus: Path, cwd: Path) -> tuple[float, int, str]:
    started = time.perf_counter()
    out = subprocess.run(
        [*mcp_rag_command(), "ingest", str(corpus), "--no-progress"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"mcp-rag ingest failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}")
    match = re.search(r"\((\d+) chunks written\)", out.stdout)
    return seconds, int(match.group(1)) if match else 0, out.stdout.strip()


class RawEmbedder:
    """fastembed's dense model alone, configured as the service configures it."""

    def __init__(self, model: Path) -> None:
        from fastembed import TextEmbedding

        from mcp_rag.settings import Settings

        tuning = {k: v for k, v in EXTRA_SETTINGS.items() if k in ("embedding_threads", "embedding_batch_size")}
        settings = Settings(_env_file=None, **tuning)  # type: ignore[call-arg]
        self.batch = settings.embedding_batch_size
        self.threads = settings.embedding_threads
        kwargs: dict[str, Any] = {"specific_model_path": str(model)}
        if self.threads:
            kwargs["threads"] = self.threads
        self.model = TextEmbedding(settings.embedding_model, **kwargs)

    def run(self, texts: list[str], *, by_length: bool = False) -> float:
        if by_length:  # the order the embedder batches in (similar lengths together: less padding)
            texts = sorted(texts, key=len)
        started = time.perf_counter()
        vectors = list(self.model.passage_embed(texts, batch_size=self.batch))
        assert len(vectors) == len(texts)
        return time.perf_counter() - started


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--docs", type=int, default=None, help="documents per ingest (default 1000; quick 200)")
    p.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 3; quick 1)")
    args = p.parse_args()
    dataset = check_dataset(args.dataset)
    n_docs = args.docs or (1000 if not (args.quick or args.tiny) else 200)
    rounds = args.rounds or (3 if not (args.quick or args.tiny) else 1)
    model = model_dir(args.model_dir)
    work = fresh_dir(args.work_dir / "ingest")
    docs = read_corpus(dataset, n_docs)
    corpus = write_subset(docs, work, "corpus.jsonl")
    pg = Postgres(args.pg_dsn)
    try:
        raw = RawEmbedder(model)
        texts: list[str] = []
        rows: list[dict[str, Any]] = []
        for r in range(rounds):
            order = ["ingest", "raw", "raw_sorted"] if r % 2 == 0 else ["raw_sorted", "raw", "ingest"]
            if not texts:
                order = ["ingest", "raw", "raw_sorted"]
            result: dict[str, Any] = {}
            for step in order:
                if step == "ingest":
                    db = f"bench_ingest_{r}"
                    dsn = pg.create(db)
                    env = server_env(fresh_dir(work / f"data-{r}"), model, dsn)
                    log(f"round {r + 1}/{rounds}: mcp-rag ingest of {len(docs)} documents")
                    seconds, chunks, _ = run_cli_ingest(env, corpus, work)
                    again, _, summary_again = run_cli_ingest(env, corpus, work)
                    if "unchanged" not in summary_again:
                        raise RuntimeError(f"second ingest did not report unchanged documents: {summary_again}")
                    if not texts:
                        texts = chunk_texts(dsn, model, work / "texts-data")
                    if chunks != len(texts):
                        raise RuntimeError(f"ingest wrote {chunks} chunks but the database holds {len(texts)}")
                    pg.drop(db)
                    result.update(ingest_seconds=seconds, fixed_seconds=again, chunks=chunks)
                else:
                    log(f"round {r + 1}/{rounds}: {step} fastembed on {len(texts)} chunk texts")
                    result[f"{step}_seconds"] = raw.run(texts, by_length=step == "raw_sorted")
            chunks = result["chunks"]
            row = {
                "docs": len(docs),
                "chunks": chunks,
                "ingest_seconds": result["ingest_seconds"],
                "fixed_seconds": result["fixed_seconds"],
                "raw_seconds": result["raw_seconds"],
                "raw_sorted_seconds": result["raw_sorted_seconds"],
                "ingest_chunks_per_s": chunks / result["ingest_seconds"],
                "ingest_docs_per_s": len(docs) / result["ingest_seconds"],
                "raw_chunks_per_s": chunks / result["raw_seconds"],
                "raw_sorted_chunks_per_s": chunks / result["raw_sorted_seconds"],
            }
            row["efficiency"] = row["ingest_chunks_per_s"] / row["raw_chunks_per_s"]
            row["efficiency_vs_sorted"] = row["ingest_chunks_per_s"] / row["raw_sorted_chunks_per_s"]
            steady = max(1e-9, result["ingest_seconds"] - result["fixed_seconds"])
            row["efficiency_excl_fixed"] = chunks / steady / row["raw_chunks_per_s"]
            rows.append(row)
            emit(BENCH, "round", round=r + 1, order="/".join(order), **row)
        summary_fields = {key: median([row[key] for row in rows]) for key in rows[0] if key not in ("docs", "chunks")}
        emit(
            BENCH,
            "summary",
            rounds=rounds,
            docs=len(docs),
            chunks=rows[0]["chunks"],
            batch_size=raw.batch,
            threads=raw.threads or "onnxruntime default",
            **summary_fields,
            targets={"efficiency": (">=", TARGET)},
        )
    finally:
        pg.close()


if __name__ == "__main__":
    from mcp_rag.logging import configure_logging

    configure_logging(level="WARNING")
    main()
