"""Optional reranking after fusion, by a server speaking the common rerank API.

``POST <url>`` with ``{"query", "documents", "texts", "top_n", "model"}`` (``documents`` for Jina,
Cohere-compatible servers, vLLM and Infinity; ``texts`` for Text Embeddings Inference) and an answer
of ``{"results": [{"index", "relevance_score"}]}`` or TEI's ``[{"index", "score"}]``. The search
over-fetches fused candidates, the reranker reorders them and the best ``top_k`` are returned. A
reranker that fails, answers nonsense or takes longer than its timeout never fails a search: the
caller gets the fused order and a notice saying why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import anyio
import httpx2

from . import metrics
from .errors import RagError
from .logging import get_logger
from .settings import Settings
from .types import MAX_TOP_K

if TYPE_CHECKING:
    from .service import SearchAnswer, SearchResult

log = get_logger(__name__)


class RerankError(RagError):
    """The reranker did not give a usable order (the search falls back to fused order)."""


@dataclass(frozen=True, slots=True)
class Reranker:
    url: str
    model: str | None
    api_key: str | None
    timeout: float
    candidates: int

    async def rerank(self, query: str, documents: Sequence[str]) -> list[tuple[int, float]]:
        """(index into ``documents``, score) pairs, best first; raises ``RerankError``."""
        if not documents:
            return []
        body: dict[str, Any] = {
            "query": query,
            "documents": list(documents),
            "texts": list(documents),
            "top_n": len(documents),
        }
        if self.model:
            body["model"] = self.model
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with anyio.fail_after(self.timeout):
                async with httpx2.AsyncClient(timeout=self.timeout) as client:
                    response = await client.post(self.url, json=body, headers=headers)
        except TimeoutError:
            raise RerankError(f"no answer within {self.timeout:g}s") from None
        except httpx2.TimeoutException:
            raise RerankError(f"no answer within {self.timeout:g}s") from None
        except httpx2.TransportError as exc:
            raise RerankError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from None
        if response.status_code != 200:
            kind = response.headers.get("content-type", "").split(";")[0] or "no content type"
            raise RerankError(f"{self.url} answered {response.status_code} ({kind})")
        try:
            payload: Any = response.json()
        except ValueError:
            raise RerankError(f"{self.url} answered something that is not JSON") from None
        return _order(payload, len(documents))


def _order(payload: Any, n: int) -> list[tuple[int, float]]:
    items = payload.get("results") if isinstance(payload, dict) else payload
    if not isinstance(items, list):
        raise RerankError("the answer has no list of results")
    seen: set[int] = set()
    out: list[tuple[int, float]] = []
    for item in items:
        if not isinstance(item, dict):
            raise RerankError("a result is not an object")
        index = item.get("index")
        score = item.get("relevance_score", item.get("score"))
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n or index in seen:
            raise RerankError(f"a result has index {index!r} (there are {n} documents)")
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
            raise RerankError(f"a result has score {score!r}")
        seen.add(index)
        out.append((index, float(score)))
    out.sort(key=lambda pair: -pair[1])
    return out


async def rerank_results(
    reranker: Reranker, query: str, results: list[SearchResult], limit: int, *, top_k: int | None = None
) -> SearchAnswer:
    """The best ``limit`` of ``results`` in the reranker's order, scored by it; on failure the fused
    order, with a notice saying why.

    The reranker sees the first ``candidates`` results (or ``limit``, up to the tool's bound, if
    more): a longer list (an evaluation's top 100) keeps its fused order after them, scored at the
    lowest reranked score. ``top_k``, when the caller keeps more than it will show (to group by
    document), is what the window is sized by instead of ``limit``."""
    from .service import SearchAnswer

    if not results:
        return SearchAnswer([], reranked=True)
    window = max(reranker.candidates, min(limit if top_k is None else top_k, MAX_TOP_K))
    head = results[:window]
    try:
        with metrics.RERANK_SECONDS.time():
            order = await reranker.rerank(query, [r.text for r in head])
    except RerankError as exc:
        metrics.RERANK_FAILURES.inc()
        log.warning("reranker failed; answering in fused order", error=str(exc))
        return SearchAnswer(results[:limit], reranked=False, notice=f"reranker failed ({exc}); results in fused order")
    ranked = [replace(head[i], score=score) for i, score in order]
    # What the reranker did not return (fewer than asked), then the rest: in fused order, below.
    returned = {i for i, _ in order}
    floor = min((score for _, score in order), default=0.0)
    rest = [r for i, r in enumerate(head) if i not in returned] + results[window:]
    ranked += [replace(r, score=floor) for r in rest]
    return SearchAnswer(ranked[:limit], reranked=True)


def create_reranker(settings: Settings) -> Reranker | None:
    if settings.reranker_url is None:
        return None
    key = settings.secret(settings.reranker_api_key, settings.reranker_api_key_file, "MCP_RAG_RERANKER_API_KEY_FILE")
    return Reranker(
        url=settings.reranker_url,
        model=settings.reranker_model,
        api_key=key,
        timeout=settings.reranker_timeout,
        candidates=settings.reranker_candidates,
    )
