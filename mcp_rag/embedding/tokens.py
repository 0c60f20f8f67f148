"""Measuring text the way the model reads it: token counts for chunking, clipping to a budget, and
the window a passage must fit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigurationError


class TokenBudget(Protocol):
    @property
    def window_tokens(self) -> int:
        """Tokens of text the model reads per passage (its window less any special tokens)."""
        ...

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens in each text, untruncated."""
        ...

    def clip(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut at a token boundary to its first ``max_tokens`` tokens."""
        ...


class TokenizerBudget:
    """A Hugging Face ``tokenizers`` tokenizer, without truncation or padding, and the model's window."""

    def __init__(self, tokenizer: Any, window_tokens: int) -> None:
        from tokenizers import Tokenizer

        own = Tokenizer.from_str(tokenizer.to_str())
        own.no_truncation()
        own.no_padding()
        self._tokenizer = own
        self._window = window_tokens

    @property
    def window_tokens(self) -> int:
        return self._window

    def count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def clip(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        if not texts:
            return []
        out = []
        for text, encoding in zip(
            texts, self._tokenizer.encode_batch(list(texts), add_special_tokens=False), strict=True
        ):
            if len(encoding.ids) <= max_tokens:
                out.append(text)
            else:
                out.append(text[: encoding.offsets[max_tokens - 1][1]] if max_tokens > 0 else "")
        return out


class CharacterBudget:
    """A remote model without a local tokenizer: ``chars_per_token`` characters count as one token.

    Chunks are cut at the same points whatever the model; the ratio errs on the long side (English
    averages about 4 characters per token), so a chunk counted within the window is within the
    model's real window too."""

    def __init__(self, window_tokens: int, chars_per_token: float) -> None:
        self._window = window_tokens
        self._ratio = chars_per_token

    @property
    def window_tokens(self) -> int:
        return self._window

    def count(self, texts: Sequence[str]) -> list[int]:
        return [math.ceil(len(text) / self._ratio) for text in texts]

    def clip(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        limit = max(0, math.floor(max_tokens * self._ratio))
        return [text[:limit] for text in texts]


def tokenizer_budget_from_file(path: Path, window_tokens: int) -> TokenizerBudget:
    """A ``TokenizerBudget`` from a Hugging Face ``tokenizer.json``."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ConfigurationError(f"cannot read the tokenizer {str(path)!r}: {exc}") from exc
    return TokenizerBudget(tokenizer, window_tokens)
