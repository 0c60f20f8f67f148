"""The default dense provider: a fastembed ONNX model in this process, loaded from a local folder
(the default model is built offline from a PyPI package, so nothing is downloaded).

Two sessions of the model: one whose calls spread over the cores (``threads``, unset: all), for a
lone passage, and a single-threaded one for queries, and for several passages at once, one call per
core side by side. A short input gains little from threads that wait for each other at every
layer; separate inputs on separate cores do not wait (docs/benchmarks.md has the measurements).

The int8 build runs without ONNX Runtime's SkipLayerNormalization fusion (each residual Add and the
LayerNorm after it stay two nodes): fused, its int8 graph spent 28% of a passage in that one kernel,
and unfused a passage costs 1.21 times less CPU. The vectors differ slightly (cosine about 0.999), so
the unfused run is a model identity of its own (``identity_name``); a database embedded with the fused
graph keeps it (``fused_layer_norm``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..types import ModelIdentity
from .base import DenseProvider, DenseVector
from .model_build import Quantization, identity_name
from .tokens import TokenBudget, TokenizerBudget

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class FastembedProvider(DenseProvider):
    def __init__(
        self,
        model: str,
        model_dir: Path | None,
        cache_dir: Path,
        *,
        threads: int | None = None,
        batch_size: int = 8,
        quantization: Quantization = "none",
        fused_layer_norm: bool = False,
    ) -> None:
        self._name = model
        self._quantization: Quantization = quantization
        self._unfused = quantization == "int8" and not fused_layer_norm
        """Run the int8 graph without the SkipLayerNormalization fusion (the float graph never fuses it)."""
        self._model_dir = model_dir
        self._cache_dir = cache_dir
        self._threads = threads
        self._workers = threads or available_cores()
        """Calls of several passages at once run side by side, on the single-threaded session."""
        self._pool: ThreadPoolExecutor | None = None
        self._batch_size = batch_size
        self._model: Any = None
        self._single: Any = None
        self._identity: ModelIdentity | None = None
        self._budget: TokenizerBudget | None = None

    def load(self) -> ModelIdentity:
        if self._identity is not None:
            return self._identity
        from fastembed import TextEmbedding

        kwargs: dict[str, Any] = {"cache_dir": str(self._cache_dir), "threads": 1}
        if self._model_dir is not None:
            kwargs["specific_model_path"] = str(self._model_dir)
        try:
            # lazy_load: fastembed finds the model and reads its tokenizer, the sessions are built here
            single: Any = TextEmbedding(self._name, lazy_load=True, **kwargs)
            single.model._ensure_tokenizer()
            model_file = Path(single.model._model_dir) / single.model.model_description.model_file
            single.model.model = _session(model_file, 1, unfused=self._unfused)
            model: Any = single
            if self._threads != 1:
                model = _sharing_tokenizer(single, _session(model_file, self._threads, unfused=self._unfused))
        except Exception as exc:
            hint = (
                f"from {self._model_dir}"
                if self._model_dir
                else "(fastembed downloads it; set MCP_RAG_EMBEDDING_MODEL_DIR offline)"
            )
            raise ConfigurationError(f"cannot load embedding model {self._name!r} {hint}: {exc}") from exc
        probe = np.asarray(next(iter(single.query_embed("dimension probe"))), dtype=np.float32)
        tokenizer = model.model.tokenizer
        # The window in text tokens: the tokenizer's max_length less [CLS] and [SEP].
        window = int((tokenizer.truncation or {}).get("max_length", 512)) - 2
        self._budget = TokenizerBudget(tokenizer, window)
        self._model = model
        self._single = single
        if self._workers > 1:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="mcp-rag-embed")
        # fastembed knows the model (and its pooling) by its own name; the identity says which build.
        self._identity = ModelIdentity(
            name=identity_name(self._name, self._quantization, fused_layer_norm=not self._unfused),
            dimension=int(probe.shape[0]),
        )
        return self._identity

    def passages_per_call(self, default: int) -> int:
        return self._batch_size * self._workers  # one model call per core

    def embed_passages(self, texts: Sequence[str]) -> list[DenseVector]:
        calls = [list(texts[i : i + self._batch_size]) for i in range(0, len(texts), self._batch_size)]
        pool = self._pool
        if len(calls) > 1 and pool is not None:
            try:
                side_by_side = pool.map(lambda call: self._embed(self._single, call), calls)
            except RuntimeError:  # closed meanwhile: the process is ending, finish the call here
                pass
            else:
                return [v for vectors in side_by_side for v in vectors]
        return [v for call in calls for v in self._embed(self._model, call)]

    def _embed(self, model: Any, texts: list[str]) -> list[DenseVector]:
        return [np.asarray(v, dtype=np.float32) for v in model.passage_embed(texts, batch_size=len(texts))]

    def embed_query(self, text: str) -> DenseVector:
        return np.asarray(next(iter(self._single.query_embed(text))), dtype=np.float32)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)  # calls in hand finish

    def token_budget(self) -> TokenBudget:
        if self._budget is None:
            raise RuntimeError("token_budget() before load()")
        return self._budget


def _session(model_file: Path, threads: int | None, *, unfused: bool) -> Any:
    """An ONNX Runtime session of ``model_file`` on ``threads`` threads (None: ONNX Runtime's
    default, one per core); with ``unfused``, without the SkipLayerNormalization fusion. fastembed
    exposes neither that nor the option below, so mcp-rag builds the sessions it hands fastembed.

    The session's threads wait idle between runs instead of spinning on a core for about 100 ms
    after each (ONNX Runtime's default): the event loop, Postgres, the single-threaded session and
    a local client need those cores right after a run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = threads or 0
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if unfused:
        options.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    return ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])


def _sharing_tokenizer(single: Any, session: Any) -> Any:
    """The fastembed model ``single`` running on ``session`` instead, with the same tokenizer."""
    import copy

    model = copy.copy(single)
    model.model = copy.copy(single.model)
    model.model.model = session
    return model


def available_cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
