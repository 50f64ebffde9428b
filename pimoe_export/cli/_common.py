"""Argument types shared by the commands: each refuses a bad value with one message naming it (argparse exit 2)."""

from __future__ import annotations

import argparse
import math


def shapes(text: str) -> list[tuple[int, int]]:
    """`1x1,2x16` -> [(1, 1), (2, 16)]: batch x sequence, both >= 1."""
    result = []
    for part in text.split(","):
        b, _, s = part.strip().partition("x")
        try:
            shape = (int(b), int(s))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shapes look like 1x1,2x16 (batch x sequence), got {text!r}") from None
        if min(shape) < 1 or max(shape) > 1 << 20:
            raise argparse.ArgumentTypeError(f"batch and sequence must be in 1..{1 << 20}, got {part.strip()!r}")
        result.append(shape)
    return result


def shape(text: str) -> tuple[int, int]:
    """One batch x sequence pair."""
    parsed = shapes(text)
    if len(parsed) != 1:
        raise argparse.ArgumentTypeError(f"expected one batch x sequence pair like 8x512, got {text!r}")
    return parsed[0]


def integer(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def number(minimum: float, maximum: float, *, open_low: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = value > minimum if open_low else value >= minimum
        if not math.isfinite(value) or not low_ok or value > maximum:
            raise argparse.ArgumentTypeError(f"must be a finite number in {'(' if open_low else '['}{minimum:g}, "
                                             f"{maximum:g}], got {text!r}")
        return value

    return parse


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="replace existing files that pimoe-export did not write (default: refuse)")


SEED = integer(0, 2**32 - 1)
