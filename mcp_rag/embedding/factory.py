"""Which dense provider the settings describe. Adding a provider: one module, one entry here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigurationError
from ..settings import Settings
from .base import DenseProvider
from .fastembed import DEFAULT_MODEL, FastembedProvider
from .tokens import CharacterBudget, TokenBudget, tokenizer_budget_from_file


def _fastembed(settings: Settings) -> DenseProvider:
    return FastembedProvider(
        settings.embedding_model,
        resolve_model_dir(settings),
        settings.models_dir / "fastembed",
        threads=settings.embedding_threads,
        batch_size=settings.embedding_batch_size,
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


def resolve_model_dir(settings: Settings) -> Path | None:
    """The local folder to load the fastembed model from, building the default one if needed.

    ``None`` means: let fastembed fetch the named model itself (needs internet).
    """
    if settings.embedding_model_dir is not None:
        return settings.embedding_model_dir
    if settings.embedding_model != DEFAULT_MODEL:
        return None
    from .model_build import DEFAULT_MODEL_DIRNAME, provision_default_model

    try:
        return provision_default_model(settings.models_dir)
    except FileNotFoundError as exc:
        if (settings.models_dir / DEFAULT_MODEL_DIRNAME).exists():
            raise ConfigurationError(str(exc)) from exc
        from .model_fetch import NOT_BUILT

        raise ConfigurationError(NOT_BUILT) from exc
