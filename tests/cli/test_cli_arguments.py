"""The command line's argument types (pimoe_export.cli._common): each accepts what it documents and refuses
the rest with argparse's exit 2."""

from __future__ import annotations

import pytest


# ------------------------------------------------------------------------------------------ CLI argument types
def test_cli_argument_types() -> None:
    import argparse

    from pimoe_export.cli._common import SEED, integer, number, shape, shapes

    assert shapes("1x1, 2x16,4x64") == [(1, 1), (2, 16), (4, 64)]
    assert shape("8x512") == (8, 512)
    assert shapes(f"{1 << 20}x1") == [(1 << 20, 1)]
    for bad, message in [("2by3", "shapes look like"), ("0x4", "must be in 1..1048576, got '0x4'"),
                         (f"{(1 << 20) + 1}x1", "1.."),
                         ("3x", "shapes look like")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            shapes(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="one batch x sequence pair"):
        shape("1x2,3x4")
    assert integer(1)("7") == 7 and integer(2, 5)("5") == 5 and integer(2, 5)("2") == 2
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be 2\.\.5, got 6"):
        integer(2, 5)("6")
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1, got 0"):
        integer(1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer"):
        integer(1)("1.5")
    assert SEED("0") == 0 and SEED(str(2**32 - 1)) == 2**32 - 1
    with pytest.raises(argparse.ArgumentTypeError):
        SEED(str(2**32))
    assert number(0, 100, open_low=True)("100") == 100.0 and number(0, 1)("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, 100\], got '0'"):
        number(0, 100, open_low=True)("0")
    for bad in ("nan", "inf", "1.5", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"finite number in \[0, 1\], got '{bad}'"):
            number(0, 1)(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number, got 'x'"):
        number(0, 1)("x")
