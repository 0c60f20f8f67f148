"""The ``openai`` dense provider: any server speaking the OpenAI embeddings API (``POST
{base}/embeddings``) — OpenAI, Ollama, vLLM, Text Embeddings Inference, LiteLLM.

A batch goes out as requests of ``request_inputs`` texts, at most ``concurrency`` in flight over
the whole process. A request that fails in a way that may pass (429, 5xx, a timeout, a dropped
connection) is retried with exponential backoff and full jitter, or after the server's
``Retry-After``; anything else fails at once. Every answer is checked (JSON, one vector per input,
the model's dimension, finite numbers) and a batch is all or nothing: one failed request fails the
call, so no document is stored with some of its chunks missing. A text over the model's window is
refused here, never cut (servers differ in whether they truncate silently).
"""

from __future__ import annotations

import email.utils
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import numpy as np
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from ..errors import ConfigurationError, EmbeddingUnavailableError, TooLargeError
from ..logging import get_logger
from ..types import ModelIdentity
from .base import DenseProvider, DenseVector
from .tokens import TokenBudget

log = get_logger(__name__)

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 60.0
"""Longest ``Retry-After`` honoured; a server asking for more fails the request instead."""
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAGS = re.compile(r"<[^>]+>")


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIProvider(DenseProvider):
    serial = False

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        budget: TokenBudget,
        api_key: str | None = None,
        dimension: int | None = None,
        request_inputs: int = 32,
        concurrency: int = 4,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
    ) -> None:
        self._url = base_url.rstrip("/") + "/embeddings"
        self._model = model
        self._budget = budget
        self._configured_dimension = dimension
        self._dimension: int | None = None  # known after load()
        self._request_inputs = request_inputs
        self._concurrency = concurrency
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx2.Client(
            headers=headers,
            timeout=timeout,
            limits=httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="embed-request")
        self._identity: ModelIdentity | None = None

    # -- the interface -------------------------------------------------------------

    def load(self) -> ModelIdentity:
        if self._identity is not None:
            return self._identity
        probe = self._request(["dimension probe"])[0]
        if self._configured_dimension is not None and probe.shape[0] != self._configured_dimension:
            raise ConfigurationError(
                f"the embedding server at {self._url} answers {probe.shape[0]}-d vectors for model {self._model!r}, "
                f"but MCP_RAG_EMBEDDING_DIMENSION is {self._configured_dimension}: set it to {probe.shape[0]} (or unset it), "
                "or configure the model you meant"
            )
        self._dimension = int(probe.shape[0])
        self._identity = ModelIdentity(self._model, self._dimension, provider="openai")
        log.info("embedding provider answers", url=self._url, model=self._model, dimension=self._dimension)
        return self._identity

    def passages_per_call(self, default: int) -> int:
        return self._request_inputs * self._concurrency

    def embed_passages(self, texts: Sequence[str]) -> list[DenseVector]:
        if not texts:
            return []
        self._check_window(texts, "a passage")
        parts = [list(texts[i : i + self._request_inputs]) for i in range(0, len(texts), self._request_inputs)]
        if len(parts) == 1:
            return self._request(parts[0])
        futures = [self._pool.submit(self._request, part) for part in parts]
        out: list[DenseVector] = []
        try:
            for future in futures:
                out.extend(future.result())
        finally:
            for future in futures:
                future.cancel()
        return out

    def embed_query(self, text: str) -> DenseVector:
        self._check_window([text], "the query")
        return self._request([text])[0]

    def token_budget(self) -> TokenBudget:
        return self._budget

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- requests ------------------------------------------------------------------

    def _check_window(self, texts: Sequence[str], what: str) -> None:
        window = self._budget.window_tokens
        for n in self._budget.count(texts):
            if n > window:
                raise TooLargeError(
                    f"{what} measures {n} tokens, over the embedding model's window of {window} tokens "
                    "(MCP_RAG_EMBEDDING_WINDOW_TOKENS); it is not cut: shorten it"
                )

    def _request(self, texts: list[str]) -> list[DenseVector]:
        attempts = self._retries + 1
        retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return retrying(self._post, texts)
        except _Retryable as exc:
            tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
            raise EmbeddingUnavailableError(f"embedding server at {self._url}: {exc} ({tries})") from None

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        jitter = wait_random_exponential(multiplier=self._backoff, max=max(self._backoff, 20.0))
        return float(jitter(state))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "embedding request failed; retrying",
            attempt=state.attempt_number,
            wait=round(state.upcoming_sleep, 2),
            error=str(exc),
        )

    def _post(self, texts: list[str]) -> list[DenseVector]:
        body = {"model": self._model, "input": texts, "encoding_format": "float"}
        with self._slots:
            try:
                response = self._client.post(self._url, json=body)
            except httpx2.TimeoutException:
                raise _Retryable(f"no answer within {self._timeout:g}s") from None
            except httpx2.TransportError as exc:
                raise _Retryable(f"cannot reach it: {exc or type(exc).__name__}") from None
        status = response.status_code
        if status in RETRY_STATUSES or status >= 500:
            retry_after = _retry_after(response.headers.get("retry-after"))
            if retry_after is not None and retry_after > MAX_RETRY_AFTER:
                raise EmbeddingUnavailableError(
                    f"embedding server at {self._url} answered {status} and asks to wait {retry_after:.0f}s "
                    f"(over {MAX_RETRY_AFTER:.0f}s): {_explain(response)}"
                )
            raise _Retryable(f"answered {status}: {_explain(response)}", retry_after)
        if status in (401, 403):
            raise EmbeddingUnavailableError(
                f"embedding server at {self._url} refused the request ({status}): {_explain(response)}; "
                "check MCP_RAG_EMBEDDING_API_KEY"
            )
        if status != 200:
            raise EmbeddingUnavailableError(f"embedding server at {self._url} answered {status}: {_explain(response)}")
        return self._vectors(response, len(texts))

    def _vectors(self, response: httpx2.Response, expected: int) -> list[DenseVector]:
        def bad(why: str) -> EmbeddingUnavailableError:
            return EmbeddingUnavailableError(f"embedding server at {self._url} answered {why}, not embeddings")

        try:
            payload: Any = response.json()
        except ValueError:
            raise bad(f"200 with {_explain(response)}") from None
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise bad("JSON without a 'data' list")
        if len(data) != expected:
            raise bad(f"{len(data)} vectors for {expected} inputs")
        slots: list[DenseVector | None] = [None] * expected
        for position, item in enumerate(data):
            if not isinstance(item, dict) or not isinstance(item.get("embedding"), list):
                raise bad("an item without an 'embedding' list")
            index = item.get("index", position)
            if not isinstance(index, int) or not 0 <= index < expected or slots[index] is not None:
                raise bad(f"an item with index {index!r}")
            try:
                vector = np.asarray(item["embedding"], dtype=np.float32)
            except (TypeError, ValueError):
                raise bad("an embedding that is not a list of numbers") from None
            if vector.ndim != 1 or not vector.size:
                raise bad("an empty embedding")
            if self._dimension is not None and vector.shape[0] != self._dimension:
                raise bad(f"{vector.shape[0]}-d vectors for a {self._dimension}-d model ({self._model!r})")
            if not np.isfinite(vector).all():
                raise bad("an embedding with NaN or infinite values")
            slots[index] = vector
        return slots  # type: ignore[return-value]  # every index 0..expected-1 was filled exactly once


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _explain(response: httpx2.Response) -> str:
    """A short reason from an error body: the API's message, an HTML page's title, or the text."""
    kind = response.headers.get("content-type", "").split(";")[0].strip() or "no content type"
    text = response.text
    if "json" in kind:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            error = payload.get("error", payload.get("message", payload.get("detail")))
            if isinstance(error, dict):
                error = error.get("message", error)
            if error:
                return _short(str(error))
    if "html" in kind or text.lstrip().startswith("<"):
        title = _TITLE.search(text)
        words = title.group(1) if title else _TAGS.sub(" ", text)
        return f"an HTML page ({_short(words) or 'empty'}), not JSON"
    return _short(text) or f"an empty {kind} body"


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_window(chunk_tokens: int, window_tokens: int) -> None:
    if chunk_tokens > window_tokens:
        raise ConfigurationError(
            f"MCP_RAG_CHUNK_TOKENS ({chunk_tokens}) is over the embedding model's window "
            f"(MCP_RAG_EMBEDDING_WINDOW_TOKENS={window_tokens}): lower it"
        )
