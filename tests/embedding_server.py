"""A real HTTP embedding server for the tests: the offline model behind the OpenAI embeddings wire
format (``POST /v1/embeddings``) and the common rerank API (``POST /rerank``), on 127.0.0.1.

Vectors and scores are the real model's. Faults are scripted per test: ``server.script(...)`` queues
what the next requests get instead of a normal answer (a status with headers, an HTML page, a
delay, vectors of another size, a model that is not the one named).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastembed import TextEmbedding
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mcp_rag.embedding import DEFAULT_MODEL
from tests.pgcluster import free_port


@dataclass
class Fault:
    """What one request gets instead of a normal answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    html: str | None = None
    json: Any = None
    delay: float = 0.0
    dimension: int | None = None  # answer vectors cut to this size
    then_answer: bool = False  # after the delay, answer normally


class EmbeddingServer:
    def __init__(self, model_dir: Path, *, served_name: str = "all-minilm") -> None:
        self.model = TextEmbedding(DEFAULT_MODEL, specific_model_path=str(model_dir), threads=1)
        self.served_name = served_name
        self.faults: deque[Fault] = deque()
        self.requests: list[dict[str, Any]] = []
        self.rerank_requests: list[dict[str, Any]] = []
        self.impostor = False  # answer with another "model" under the same name (vectors rotated)
        self.rerank_down = False
        self.rerank_delay = 0.0
        self.rerank_style = "results"  # "results" (Jina/Cohere) or "list" (TEI)
        self._lock = threading.Lock()
        self.port = free_port()
        app = Starlette(
            routes=[
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/rerank", self._rerank, methods=["POST"]),
            ]
        )
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def rerank_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/rerank"

    def start(self) -> EmbeddingServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test embedding server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def script(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def reset(self) -> None:
        self.faults.clear()
        self.requests.clear()
        self.rerank_requests.clear()
        self.impostor = False
        self.rerank_down = False
        self.rerank_delay = 0.0
        self.rerank_style = "results"

    def vectors(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            out = np.asarray(list(self.model.passage_embed(texts, batch_size=32)), dtype=np.float32)
        if self.impostor:
            out = np.roll(out, 1, axis=1)  # same size, same norm: another model as far as anyone can tell
        return out

    async def _embeddings(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        fault = self.faults.popleft() if self.faults else None
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and not fault.then_answer and fault.dimension is None:
            if fault.html is not None:
                return HTMLResponse(fault.html, status_code=fault.status, headers=fault.headers)
            return JSONResponse(fault.json or {"error": {"message": "scripted"}}, fault.status, headers=fault.headers)
        if body.get("model") != self.served_name:
            return JSONResponse({"error": {"message": f"model {body.get('model')!r} not found"}}, 404)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = await run_in_threadpool(self.vectors, texts)
        if fault is not None and fault.dimension is not None:
            vectors = vectors[:, : fault.dimension]
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
        data.reverse()  # the API gives each item its index: clients must not rely on the order
        return JSONResponse({"object": "list", "model": self.served_name, "data": data, "usage": {}})

    async def _rerank(self, request: Request) -> Response:
        body = await request.json()
        self.rerank_requests.append(body)
        if self.rerank_delay:
            await asyncio.sleep(self.rerank_delay)
        if self.rerank_down:
            return HTMLResponse("<html><title>502 Bad Gateway</title></html>", status_code=502)
        documents = body.get("documents") or body.get("texts") or []
        documents = [d["text"] if isinstance(d, dict) else d for d in documents]
        vectors = await run_in_threadpool(self.vectors, [body["query"], *documents])
        scores = vectors[1:] @ vectors[0]
        order = sorted(range(len(documents)), key=lambda i: -float(scores[i]))
        top_n = body.get("top_n") or len(documents)
        if self.rerank_style == "list":
            return JSONResponse([{"index": i, "score": float(scores[i])} for i in order[:top_n]])
        results = [{"index": i, "relevance_score": float(scores[i])} for i in order[:top_n]]
        return JSONResponse({"model": body.get("model"), "results": results})


@contextmanager
def running(model_dir: Path) -> Iterator[EmbeddingServer]:
    server = EmbeddingServer(model_dir).start()
    try:
        yield server
    finally:
        server.stop()


def main() -> None:
    """``python -m tests.embedding_server --model-dir DIR [--port N]``: serve until killed (benchmarks)."""
    import argparse
    import signal
    import sys

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="ONNX threads of the served model (default: all cores)")
    args = p.parse_args()
    server = EmbeddingServer(args.model_dir)
    if args.threads != 1:
        server.model = TextEmbedding(DEFAULT_MODEL, specific_model_path=str(args.model_dir), threads=args.threads)
    if args.port:
        server.port = args.port
        server._server.config.port = args.port
    server.start()
    print(f"ready {server.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
