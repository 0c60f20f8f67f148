"""What a search result costs an agent's context: characters and model tokens of what the search tool
returns, against the passage text it carries, in the text format agents read now and in the JSON
formats it replaced; and the size of ``tools/list``. Over a real stdio server with the MCP client.

    python -m bench.results [--quick | --tiny] [--dataset ../shared/eval/scifact-train]

Overhead = characters (tokens) of the format / characters (tokens) of the passages - 1, per search,
median over the queries; the target is <= 0.40 for the text agents read.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import anyio

from bench.common import (
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
    read_queries,
    server_env,
    stdio_client,
    write_subset,
)

BENCH = "results"


def formats(result: Any) -> dict[str, str]:
    text = "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")
    structured = result.structured_content
    return {
        "text": text,
        "json_pretty": json.dumps(structured, indent=2, ensure_ascii=False),
        "json_compact": json.dumps(structured, separators=(",", ":"), ensure_ascii=False),
    }


async def measure(env: dict[str, str], work: Path, queries: list[str], top_k: int, tokenizer: Any) -> None:
    chars: dict[str, list[float]] = {}
    tokens: dict[str, list[float]] = {}
    hits = 0
    async with stdio_client(env, work / "server.log", work) as client:
        listed = await client.list_tools()
        schemas = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in listed.tools]
        emit(
            BENCH,
            "tools_list",
            tools=len(schemas),
            chars=len(json.dumps(schemas)),
            output_schema_chars=sum(len(json.dumps(s.get("outputSchema", {}))) for s in schemas),
        )
        for query in queries:
            result = await client.call_tool("search", {"query": query, "top_k": top_k})
            found = result.structured_content["results"]
            if not found:
                continue
            hits += len(found)
            passages = "\n".join(h["text"] for h in found)
            base_chars, base_tokens = len(passages), len(tokenizer.encode(passages).ids)
            for name, rendered in formats(result).items():
                chars.setdefault(name, []).append(len(rendered) / base_chars - 1)
                tokens.setdefault(name, []).append(len(tokenizer.encode(rendered).ids) / base_tokens - 1)
    for name in chars:
        emit(
            BENCH,
            "format",
            format=name,
            top_k=top_k,
            searches=len(chars[name]),
            hits=hits,
            overhead_chars=median(chars[name]),
            overhead_tokens=median(tokens[name]),
            targets={"overhead_chars": ("<=", 0.40)} if name == "text" else None,
        )


def main() -> None:
    p = parser(__doc__ or "")
    args = p.parse_args()
    dataset = check_dataset(args.dataset)
    model = model_dir(args.model_dir)
    work = fresh_dir(args.work_dir / "results")
    n_docs, n_queries = (60, 10) if args.tiny else (1000, 50) if args.quick else (5183, 300)
    corpus = write_subset(read_corpus(dataset, n_docs), work / "corpus", "corpus.jsonl")
    queries = read_queries(dataset, n_queries)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    tokenizer.no_truncation()
    pg = Postgres(args.pg_dsn)
    try:
        env = server_env(fresh_dir(work / "data"), model, pg.create("bench_results"))
        log(f"ingesting {n_docs} documents")
        subprocess.run(
            [*mcp_rag_command(), "ingest", str(corpus), "--no-progress"],
            env=env,
            cwd=work,
            check=True,
            capture_output=True,
        )
        for top_k in (5, 10):
            anyio.run(measure, env, work, queries, top_k, tokenizer)
        pg.drop("bench_results")
    finally:
        pg.close()


if __name__ == "__main__":
    from mcp_rag.logging import configure_logging

    configure_logging(level="WARNING")
    main()
