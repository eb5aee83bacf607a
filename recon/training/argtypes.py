"""``argparse`` types of the command lines: a bad number exits with status 2 naming the option
at parse time, before any data is built or any network trained.

>>> parser.add_argument("--epochs", type=int_at_least(1))
>>> parser.add_argument("--lr", type=float_above(0.0, strict=True))
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

__all__ = ["int_at_least", "float_above", "float_in"]


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an int ``>= low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
        return value
    parse.__name__ = f"int>={low}"
    return parse


def float_in(low: Optional[float] = None, high: Optional[float] = None, *, strict_low: bool = False,
             strict_high: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in the interval ``[low, high]`` (``strict_*``: open end;
    ``None``: unbounded).  NaN and ±inf are always refused."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if strict_low else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if strict_high else '<='} {high:g}")
    bound = " and ".join(parts)
    what = f"a finite number{' ' + bound if bound else ''}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if strict_low else value >= low
        if ok and high is not None:
            ok = value < high if strict_high else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = "float" + bound.replace(" ", "")
    return parse


def float_above(low: float, strict: bool) -> Callable[[str], float]:
    """argparse type: a finite float ``> low`` (``strict``) or ``>= low``."""
    return float_in(low, strict_low=strict)
