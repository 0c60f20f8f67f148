"""Which dense provider the settings describe. Adding a provider: one module, one entry here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigurationError
from ..settings import Settings
from .base import DenseProvider
from .fastembed import DEFAULT_MODEL, FastembedProvider


def _fastembed(settings: Settings) -> DenseProvider:
    return FastembedProvider(
        settings.embedding_model,
        resolve_model_dir(settings),
        settings.models_dir / "fastembed",
        threads=settings.embedding_threads,
        batch_size=settings.embedding_batch_size,
    )


PROVIDERS: dict[str, Callable[[Settings], DenseProvider]] = {"fastembed": _fastembed}


def create_provider(settings: Settings, name: str = "fastembed") -> DenseProvider:
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
