"""Argument types for the `pdserve` commands: a bad value is a one-line argparse error."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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
