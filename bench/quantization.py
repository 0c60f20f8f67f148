"""The encoder's CPU per embedding, float32 against the int8 build of the same model, side by side.

    python -m bench.quantization [--quick | --tiny] [--passages 256] [--queries 300] [--threads 1]

Both builds are loaded in this process through the product's fastembed provider (the folders
``mcp-rag model build`` and ``mcp-rag model build --quantization int8`` produce) and used in turn:
each round embeds one batch of passages (the ingest batch size, 8) with one model, then the same
batch with the other, alternating which goes first, so load on this shared machine falls on both
alike. Queries are embedded one at a time the same way. The figure is CPU time of the whole
process (every ONNX Runtime thread) per passage and per query, as medians over the rounds, with
the int8/float ratio; wall time per item beside it; and how far the int8 vectors move (cosine to
the float vector of the same text). A third model is the int8 build run with ONNX Runtime's
SkipLayerNormalization fusion (``int8_fused``, how mcp-rag ran it before 2026-12-01), with its time
over the unfused run's (``fused_ratio``) and the cosine between the two runs' vectors.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    check_dataset,
    emit,
    log,
    machine,
    median,
    model_dir,
    parser,
    read_corpus,
    read_queries,
)

BENCH = "quantization"
BATCH = 8


def provider(folder: Path, threads: int | None, work: Path, *, fused: bool = False) -> Any:
    from mcp_rag.embedding.factory import create_provider
    from mcp_rag.settings import Settings

    settings = Settings(
        data_dir=work,
        embedding_model_dir=folder,
        embedding_threads=threads,
        embedding_fused_layer_norm=fused,
        _env_file=None,
    )
    instance = create_provider(settings, "fastembed")
    instance.load()
    return instance


def timed(call: Any) -> tuple[float, float, Any]:
    """(CPU seconds of this process, wall seconds, result) of ``call()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = call()
    return time.process_time() - cpu, time.perf_counter() - wall, result


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--passages", type=int, default=256, help="passages embedded by each model")
    p.add_argument("--queries", type=int, default=300, help="queries embedded by each model, one at a time")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (the deployment sets 1; 0: default)")
    p.add_argument("--int8-model-dir", type=Path, default=None, help="the int8 folder (default: build it)")
    args = p.parse_args()
    if args.tiny:
        args.passages, args.queries = 16, 10
    elif args.quick:
        args.passages, args.queries = 64, 100
    dataset = check_dataset(args.dataset)
    threads = args.threads or None

    from mcp_rag.embedding.model_build import provision_default_model

    fp32_dir = model_dir(args.model_dir, quantization="none")
    # the int8 build beside the float one (quantised from it when missing)
    int8_dir = args.int8_model_dir or provision_default_model(fp32_dir.parent, quantization="int8")
    work = args.work_dir / "quantization"
    models = {
        "fp32": provider(fp32_dir, threads, work),
        "int8": provider(int8_dir, threads, work),
        "int8_fused": provider(int8_dir, threads, work, fused=True),
    }
    for name, model in models.items():
        log(f"{name}: {model.load().describe()} from {fp32_dir if name == 'fp32' else int8_dir}")

    docs = read_corpus(dataset, args.passages)
    passages = [f"{d.get('title', '')}. {d['text']}".strip(". ") for d in docs]
    queries = read_queries(dataset, args.queries)
    for model in models.values():  # warm-up: the first calls allocate ONNX Runtime's arena
        model.embed_passages(passages[:BATCH])
        model.embed_query(queries[0])

    cpu: dict[str, dict[str, list[float]]] = {n: {"passage": [], "query": []} for n in models}
    wall: dict[str, dict[str, list[float]]] = {n: {"passage": [], "query": []} for n in models}
    vectors: dict[str, list[Any]] = {n: [] for n in models}
    log(f"{len(passages)} passages in batches of {BATCH}, {len(queries)} queries, threads={threads or 'default'}")
    for round_, start in enumerate(range(0, len(passages), BATCH)):
        batch = passages[start : start + BATCH]
        for name in _turns(list(models), round_):
            c, w, out = timed(lambda m=models[name], texts=batch: m.embed_passages(texts))
            cpu[name]["passage"].append(c / len(batch))
            wall[name]["passage"].append(w / len(batch))
            vectors[name].extend(out)
    for i, query in enumerate(queries):
        for name in _turns(list(models), i):
            c, w, _ = timed(lambda m=models[name], text=query: m.embed_query(text))
            cpu[name]["query"].append(c)
            wall[name]["query"].append(w)

    cosines = _cosines(vectors["fp32"], vectors["int8"])
    fused_cosines = _cosines(vectors["int8"], vectors["int8_fused"])
    results: dict[str, dict[str, float]] = {}
    for kind in ("passage", "query"):
        row = {f"{name}_cpu_ms": median(cpu[name][kind]) * 1000 for name in models} | {
            f"{name}_wall_ms": median(wall[name][kind]) * 1000 for name in models
        }
        row["cpu_ratio"] = row["fp32_cpu_ms"] / row["int8_cpu_ms"]
        row["wall_ratio"] = row["fp32_wall_ms"] / row["int8_wall_ms"]
        row["fused_ratio"] = row["int8_fused_cpu_ms"] / row["int8_cpu_ms"]
        results[kind] = row
        emit(
            BENCH,
            f"{kind}_embedding",
            samples=len(cpu["fp32"][kind]),
            per="passage (batches of 8)" if kind == "passage" else "query (one at a time)",
            threads=threads or "default",
            **row,
        )
    emit(
        BENCH,
        "int8_vectors",
        passages=len(cosines),
        cosine_mean=float(cosines.mean()),
        cosine_min=float(cosines.min()),
        fused_cosine_mean=float(fused_cosines.mean()),
        fused_cosine_min=float(fused_cosines.min()),
        model_onnx_mb={
            "fp32": (fp32_dir / "model.onnx").stat().st_size / 2**20,
            "int8": (int8_dir / "model.onnx").stat().st_size / 2**20,
        },
        machine=machine(),
    )
    print(
        "\n                 fp32 CPU ms   int8 CPU ms   ratio   fp32 wall ms   int8 wall ms   ratio"
        "   int8 fused CPU ms   ratio",
        *(
            f"per {kind:<8}  {r['fp32_cpu_ms']:>11.2f}   {r['int8_cpu_ms']:>11.2f}   {r['cpu_ratio']:>5.2f}x"
            f"   {r['fp32_wall_ms']:>12.2f}   {r['int8_wall_ms']:>12.2f}   {r['wall_ratio']:>5.2f}x"
            f"   {r['int8_fused_cpu_ms']:>17.2f}   {r['fused_ratio']:>5.2f}x"
            for kind, r in results.items()
        ),
        f"int8 vs fp32 cosine: mean {cosines.mean():.4f}, min {cosines.min():.4f} over {len(cosines)} passages",
        f"int8 vs int8 fused cosine: mean {fused_cosines.mean():.5f}, min {fused_cosines.min():.5f}",
        sep="\n",
        file=sys.stderr,
    )


def _turns(names: list[str], round_: int) -> list[str]:
    """``names`` rotated by ``round_``: each model goes first, second and last in turn."""
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def _cosines(a: list[Any], b: list[Any]) -> Any:
    x, y = np.stack(a), np.stack(b)
    return (x * y).sum(axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


if __name__ == "__main__":
    main()
