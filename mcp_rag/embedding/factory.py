"""Which dense provider the settings describe. Adding a provider: one module, one entry here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigurationError
from ..logging import get_logger
from ..settings import Settings
from ..types import FUSED_INT8_SUFFIX, ModelIdentity, base_model_name
from .base import DenseProvider
from .fastembed import DEFAULT_MODEL, FastembedProvider
from .model_build import (
    DEFAULT_MODEL_DIRNAME,
    Quantization,
    folder_quantization,
    provision_default_model,
)
from .tokens import CharacterBudget, TokenBudget, tokenizer_budget_from_file


def _fastembed(settings: Settings) -> DenseProvider:
    model_dir, quantization = resolve_model(settings)
    return FastembedProvider(
        settings.embedding_model,
        model_dir,
        settings.models_dir / "fastembed",
        threads=settings.embedding_threads,
        batch_size=settings.embedding_batch_size,
        quantization=quantization,
        fused_layer_norm=bool(settings.embedding_fused_layer_norm),
    )


def _openai(settings: Settings) -> DenseProvider:
    from .openai import OpenAIProvider, check_window

    assert settings.embedding_base_url is not None  # the settings refuse openai without it
    window = settings.embedding_window_tokens
    check_window(settings.chunk_tokens, window)
    budget: TokenBudget
    if settings.embedding_tokenizer is not None:
        budget = tokenizer_budget_from_file(settings.embedding_tokenizer, window)
    else:
        budget = CharacterBudget(window, settings.embedding_chars_per_token)
    api_key = settings.secret(
        settings.embedding_api_key, settings.embedding_api_key_file, "MCP_RAG_EMBEDDING_API_KEY_FILE"
    )
    return OpenAIProvider(
        base_url=settings.embedding_base_url,
        model=settings.embedding_model,
        budget=budget,
        api_key=api_key,
        dimension=settings.embedding_dimension,
        request_inputs=settings.embedding_request_inputs,
        concurrency=settings.embedding_concurrency,
        timeout=settings.embedding_timeout,
        retries=settings.embedding_retries,
    )


DEFAULT_QUANTIZATION: Quantization = "int8"
"""The build of the default model a new database gets when MCP_RAG_EMBEDDING_QUANTIZATION is unset:
int8 (run unfused) costs 2.4 times less CPU per embedding and scored within 0.005 nDCG@10 of float32 on
SciFact-train through the search tool (docs/benchmarks.md, "The int8 encoder" and "The int8 graph without
the SkipLayerNormalization fusion")."""

log = get_logger(__name__)


class RecordsModel(Protocol):
    def recorded_model(self) -> Awaitable[ModelIdentity | None]: ...


async def keep_recorded_build(settings: Settings, store: RecordsModel) -> Settings:
    """``settings`` with the build of the default model the database's vectors were made with, when
    MCP_RAG_EMBEDDING_QUANTIZATION is unset: data embedded before the default build changed keeps its
    model (a new database gets the default build). An explicit setting or model folder is left as it is
    (a mismatch is then refused with the usual message). Likewise, with MCP_RAG_EMBEDDING_FUSED_LAYER_NORM
    unset, vectors of the int8 build run with the fused graph keep that graph."""
    if settings.embedding_provider != "fastembed":
        return settings
    recorded = await store.recorded_model()
    if recorded is None or recorded.provider != "fastembed":
        return settings
    update: dict[str, Any] = {}
    if settings.embedding_fused_layer_norm is None and recorded.name.endswith(FUSED_INT8_SUFFIX):
        log.info("the database's vectors were made with the int8 build's fused graph; keeping it", model=recorded.name)
        update["embedding_fused_layer_norm"] = True
    build: Quantization = "none" if recorded.name == base_model_name(recorded.name) else "int8"
    if (
        settings.embedding_quantization is None
        and settings.embedding_model_dir is None
        and settings.embedding_model == DEFAULT_MODEL
        and base_model_name(recorded.name) == DEFAULT_MODEL
        and build != DEFAULT_QUANTIZATION
    ):
        log.info(
            "the database's vectors belong to another build of the default model; keeping it",
            model=recorded.name,
            quantization=build,
        )
        update["embedding_quantization"] = build
    return settings.model_copy(update=update) if update else settings


PROVIDERS: dict[str, Callable[[Settings], DenseProvider]] = {"fastembed": _fastembed, "openai": _openai}


def create_provider(settings: Settings, name: str | None = None) -> DenseProvider:
    name = name or settings.embedding_provider
    try:
        make = PROVIDERS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown embedding provider {name!r}: use one of {', '.join(sorted(PROVIDERS))}"
        ) from None
    return make(settings)


def resolve_model(settings: Settings) -> tuple[Path | None, Quantization]:
    """The local folder to load the fastembed model from, building the default one if needed, and
    which build it holds (``int8`` gets a model identity of its own).

    A ``None`` folder means: let fastembed fetch the named model itself (needs internet).
    """
    wanted = settings.embedding_quantization
    if settings.embedding_model_dir is not None:
        built = folder_quantization(settings.embedding_model_dir)
        if wanted is not None and built is not None and built != wanted:
            raise ConfigurationError(
                f"MCP_RAG_EMBEDDING_QUANTIZATION is {wanted!r} but the model folder {settings.embedding_model_dir} "
                f"holds the {built!r} build (its BUILD_INFO.json says so): point MCP_RAG_EMBEDDING_MODEL_DIR at the "
                f"{wanted!r} build (`mcp-rag model build --quantization {wanted}`) or unset the quantization"
            )
        return settings.embedding_model_dir, built or wanted or "none"
    if settings.embedding_model != DEFAULT_MODEL:
        if wanted == "int8":
            raise ConfigurationError(
                f"MCP_RAG_EMBEDDING_QUANTIZATION=int8 is built for the default model ({DEFAULT_MODEL}) only; for "
                f"{settings.embedding_model!r} quantise it yourself and set MCP_RAG_EMBEDDING_MODEL_DIR to that folder"
            )
        return None, "none"
    quantization = wanted or DEFAULT_QUANTIZATION
    try:
        return provision_default_model(settings.models_dir, quantization=quantization), quantization
    except FileNotFoundError as exc:
        if (settings.models_dir / DEFAULT_MODEL_DIRNAME).exists():
            raise ConfigurationError(str(exc)) from exc
        from .model_fetch import NOT_BUILT

        raise ConfigurationError(NOT_BUILT) from exc
