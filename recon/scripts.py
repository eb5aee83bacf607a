"""Helpers for the command lines of the examples and benchmarks: ``--help`` in plain text, and
``--quick`` smoke runs that never overwrite measured results and say what they are.

``help_parser(__doc__)`` is an ``argparse.ArgumentParser`` whose description is the script's
docstring with the reStructuredText markup taken out (``:func:`recon.fit``` → ``recon.fit``,
double back-quotes dropped, ``Usage::`` → ``Usage:``). ``apply_quick(parser, args, argv, {...})``
applies a smoke configuration: it refuses (``parser.error``, exit status 2) an option given on
the command line that ``--quick`` would change, moves the output to ``runs/quick/...`` unless
``--out`` was given, and returns the lines the script prints first (the first one is
:data:`SMOKE_RUN`).
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Mapping, Optional, Sequence

__all__ = ["SMOKE_RUN", "plain_text", "help_parser", "explicit_options", "apply_quick"]

SMOKE_RUN = "smoke run: numbers are not meaningful"

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|ref|doc):`(~?)([^`<]+?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``(.+?)``", re.S)


def plain_text(doc: str) -> str:
    """``doc`` without reST markup: roles show their target (``~a.b.C`` shows ``C``), literals
    lose their double back-quotes, and a paragraph's closing ``::`` becomes ``:``."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), doc)
    text = _LITERAL.sub(lambda m: m.group(1), text)
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)
    return re.sub(r"^\s*::$\n?", "", text, flags=re.M).strip("\n")


def help_parser(doc: str, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` describing the script by ``plain_text(doc)``, line breaks kept."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    return argparse.ArgumentParser(description=plain_text(doc), **kwargs)


def explicit_options(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> set:
    """The ``dest`` names of the options that ``argv`` sets (as opposed to their defaults)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    saved = {id(a): a.default for a in parser._actions}
    saved_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        given, _ = parser.parse_known_args(argv)
    finally:
        for action in parser._actions:
            action.default = saved[id(action)]
        parser._defaults.update(saved_defaults)
    return set(vars(given))


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return max(action.option_strings, key=len)
    return dest


def apply_quick(parser: argparse.ArgumentParser, args: argparse.Namespace,
                argv: Optional[Sequence[str]], settings: Mapping[str, Any],
                out: Optional[str] = None) -> list:
    """Set ``args.<dest> = value`` for every ``settings`` item of a ``--quick`` run.

    An option given on the command line whose value ``--quick`` would change is refused with
    ``parser.error`` naming it. ``out`` (e.g. ``"runs/quick/ct_joint"``) replaces ``args.out``
    unless ``--out`` was given. Returns the lines to print: :data:`SMOKE_RUN`, then the settings.
    """
    given = explicit_options(parser, argv)
    clashes = [f"{_flag(parser, d)} {getattr(args, d)!r}" for d, v in settings.items()
               if d in given and getattr(args, d) != v]
    if clashes:
        parser.error(f"--quick sets {', '.join(_flag(parser, d) for d in settings)} itself; "
                     f"drop {', '.join(clashes)} or drop --quick")
    for dest, value in settings.items():
        setattr(args, dest, value)
    if out is not None and "out" not in given:
        args.out = out
    shown = ", ".join(f"{_flag(parser, d)} {v}" for d, v in settings.items())
    lines = [SMOKE_RUN, f"--quick: {shown}"]
    if out is not None:
        lines.append(f"--quick: writing to {args.out}")
    return lines
