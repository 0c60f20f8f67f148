"""Retrieval quality: ``mcp-rag eval DATASET`` (the CLI, a subprocess) for every search mode.

    python -m bench.retrieval [--quick] [--dataset ../shared/eval/scifact-train]

nDCG@10 and Recall@100 per mode, as the CLI prints them (the corpus is ingested into a scratch
collection, each judged query searched in each mode, chunks folded into documents). ``--quick``
evaluates a subset: the first 100 judged queries over a corpus of their relevant documents plus
the first 1,000 others (figures not comparable with the full run).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import time
from pathlib import Path

from bench.common import (
    Postgres,
    check_dataset,
    emit,
    fresh_dir,
    log,
    mcp_rag_command,
    model_dir,
    parser,
    read_corpus,
    server_env,
    write_subset,
)

BENCH = "retrieval"
ROW = re.compile(r"^(hybrid|dense|lexical)\s+([0-9.]+)\s+([0-9.]+)\s+(\d+)\s+([0-9.]+)\s*$")


def quick_subset(dataset: Path, folder: Path, n_queries: int = 100, n_other: int = 1000) -> Path:
    """The first judged queries with their relevant documents plus other documents as distractors."""
    queries = [json.loads(line) for line in (dataset / "queries.jsonl").read_text().splitlines() if line.strip()]
    qrels: dict[str, list[tuple[str, str]]] = {}
    with (dataset / "qrels.tsv").open(newline="") as handle:
        for row in csv.reader(handle, delimiter="\t"):
            if len(row) >= 3 and row[0] != "query-id":
                qrels.setdefault(row[0], []).append((row[1], row[2]))
    chosen = [q for q in queries if str(q["_id"]) in qrels][:n_queries]
    relevant = {doc for q in chosen for doc, _ in qrels[str(q["_id"])]}
    corpus = read_corpus(dataset)
    docs = [d for d in corpus if str(d["_id"]) in relevant]
    docs += [d for d in corpus if str(d["_id"]) not in relevant][:n_other]
    write_subset(docs, folder, "corpus.jsonl")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in chosen))
    with (folder / "qrels.tsv").open("w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for q in chosen:
            for doc, score in qrels[str(q["_id"])]:
                handle.write(f"{q['_id']}\t{doc}\t{score}\n")
    return folder


def main() -> None:
    p = parser(__doc__ or "")
    args = p.parse_args()
    dataset = check_dataset(args.dataset)
    model = model_dir(args.model_dir)
    work = fresh_dir(args.work_dir / "retrieval")
    subset = False
    if args.quick and not args.tiny:
        dataset, subset = quick_subset(dataset, work / "dataset"), True
    pg = Postgres(args.pg_dsn)
    try:
        dsn = pg.create("bench_retrieval")
        env = server_env(fresh_dir(work / "data"), model, dsn)
        log(f"mcp-rag eval {dataset} (ingests the whole corpus: minutes)")
        started = time.perf_counter()
        out = subprocess.run(
            [*mcp_rag_command(), "eval", str(dataset)], env=env, cwd=work, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - started
        if out.returncode != 0:
            raise RuntimeError(f"mcp-rag eval failed ({out.returncode}):\n{out.stdout}\n{out.stderr[-3000:]}")
        rows = [m.groups() for m in map(ROW.match, out.stdout.splitlines()) if m]
        if not rows:
            raise RuntimeError(f"no result rows in the eval output:\n{out.stdout}")
        for mode, ndcg, recall, queries, folded in rows:
            emit(
                BENCH,
                "eval",
                mode=mode,
                dataset=args.dataset.name,
                subset=subset,
                ndcg_at_10=float(ndcg),
                recall_at_100=float(recall),
                queries=int(queries),
                ndcg_at_10_folded=float(folded),
                total_seconds=seconds,
            )
        pg.drop("bench_retrieval")
    finally:
        pg.close()


if __name__ == "__main__":
    from mcp_rag.logging import configure_logging

    configure_logging(level="WARNING")
    main()
