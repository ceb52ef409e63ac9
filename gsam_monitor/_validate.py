"""Argument checks shared across the package: positive ints and "did you mean" suggestions.

A leaf module (standard library only), so that every layer can use it.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable

__all__ = ["closest", "is_positive_int", "positive_int", "suggestions", "with_suggestion"]


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is an integer (Python or numpy, not a bool) of at least 1."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


def positive_int(value: object, name: str, hint: str = "", *, sep: str = ";") -> int:
    """``value`` as an ``int`` when it is a positive integer (a bool is not one).

    Args:
        value: What the caller passed.
        name: The argument as the message should name it (``"every_n_steps"``,
            ``"GSAMCallback(every_n_steps=)"``).
        hint: Text after "must be a positive int", e.g. ``" (or None for every token)"``.
        sep: The punctuation before "got".

    Raises:
        ValueError: ``"{name} must be a positive int{hint}{sep} got {value!r}."``.
    """
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive int{hint}{sep} got {value!r}.")
    return int(value)  # type: ignore[call-overload]


def suggestions(word: str, choices: Iterable[str], n: int = 1) -> list[str]:
    """Up to ``n`` choices near a misspelt ``word``, nearest first (``difflib``'s 0.6 cutoff)."""
    return difflib.get_close_matches(word, list(choices), n=n)


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice nearest to a misspelt ``word``, or ``None`` when none is near."""
    match = suggestions(word, choices)
    return match[0] if match else None


def with_suggestion(word: str, choices: Iterable[str]) -> str:
    """``'word'``, followed by ``(did you mean 'choice'?)`` when a choice is near."""
    match = closest(word, choices)
    return f"{word!r}" + (f" (did you mean {match!r}?)" if match else "")
