"""Argument types for the `pdserve` commands: a bad value is a one-line argparse error."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def int_in(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An integer in [minimum, maximum]."""
    expected = (f"an integer >= {minimum}" if maximum is None
                else f"an integer in [{minimum}, {maximum}]")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def positive_float(text: str) -> float:
    """A number > 0; ``inf`` is allowed (a rate that sends everything at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def checked(parse: Callable[[str], Any],
            problem: Callable[[Any], str | None]) -> Callable[[str], Any]:
    """A config field's own check as an argparse type: ``parse`` the text, then ask
    ``problem`` what the field wants instead (None: it takes the value). Text ``parse``
    refuses is checked as it is, so the error still says what was expected."""

    def parse_checked(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = text
        expected = problem(value)
        if expected is not None:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid, must be {expected}")
        return value

    return parse_checked
