"""Argument types shared by the `sorterd` subcommands (argparse ``type=`` callables).

Each raises argparse.ArgumentTypeError naming the text given and what is
allowed, so argparse prints one clear line and exits 2.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer > 0 (counts: stones, threads, batch sizes)."""
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return v


def positive_float(text: str) -> float:
    """A number > 0 (rates)."""
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number")
    return v


def fault(text: str) -> tuple[str, float]:
    """NAME=NUMBER, a simulated fault or drift; the name is checked by the config schema, not here."""
    name, sep, value = text.partition("=")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=NUMBER, e.g. backlight=-0.08") from None
