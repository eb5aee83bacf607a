"""Griffe extension for the docs build: the reStructuredText bits of the library's docstrings
rendered as Markdown (the docstrings themselves stay as they are).

* ``.. math::`` blocks become MathJax display blocks (``$$ … $$``, pymdownx.arithmatex);
* roles ``:class:`~bilevel.X``` (also ``:func:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:``)
  become code spans showing the name as the reader of the source sees it;
* ``::`` literal blocks and ``>>>`` doctest lines become fenced code blocks;
* numpy-style ``Parameters`` / ``Returns`` headings underlined with dashes, followed by
  ``name: text`` lines, become a bold label and a bulleted list (a setext heading inside a
  docstring would otherwise land in the page's table of contents, once per class).
"""
from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")
_SECTION = re.compile(r"^(?P<indent>\s*)(?P<title>[A-Z][A-Za-z ]+)\n(?P=indent)-{3,}\s*$", re.M)


def _role(match: re.Match) -> str:
    text = match.group(0)
    name = match.group(1)
    if ":`~" in text:                 # ``~a.b.C`` shows ``C``
        name = name.rsplit(".", 1)[-1]
    return f"``{name}``"


def _indented_block(lines: list[str], start: int) -> tuple[list[str], int]:
    """The indented block after line ``start`` (blank lines inside kept), dedented."""
    base = len(lines[start]) - len(lines[start].lstrip())
    block, i = [], start + 1
    while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > base):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
        i -= 1
    return textwrap.dedent("\n".join(block)).strip("\n").splitlines(), i


def _blocks(text: str) -> str:
    """``.. math::`` → ``$$``; a paragraph ending in ``::`` followed by an indented block → a
    fenced code block."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        if stripped.startswith(".. math::"):
            body, i = _indented_block(lines, i)
            first = stripped[len(".. math::"):].strip()
            out += [indent + "$$"] + ([indent + first] if first else []) + \
                [indent + b for b in body] + [indent + "$$"]
            continue
        if stripped.startswith(">>>"):           # doctest lines would read as blockquotes
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            out += [indent + "```pycon"] + [indent + ln.strip() for ln in lines[i:j]] + [indent + "```"]
            i = j
            continue
        if stripped.endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            body, j = _indented_block(lines, i)
            if body:
                lead = line.rstrip()[:-2].rstrip()
                if lead.strip():
                    out.append(lead + ":")
                out += ["", indent + "```text"] + [indent + b for b in body] + [indent + "```"]
                i = j
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _sections(text: str) -> str:
    """``Parameters\\n----------\\nname: text`` → ``**Parameters**`` and ``- name: text``."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _SECTION.match("\n".join(lines[i:i + 2])) if i + 1 < len(lines) else None
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        out += [f"{indent}**{m.group('title').strip()}**", ""]
        i += 2
        while i < len(lines) and lines[i].strip():
            line = lines[i]
            if len(line) - len(line.lstrip()) == len(indent):
                out.append(f"{indent}- {line.strip()}")
            else:
                out.append(f"{indent}  {line.strip()}")
            i += 1
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    """The conversion applied to every docstring (see the module docstring)."""
    return _sections(_blocks(_ROLE.sub(_role, text)))


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of a loaded package with :func:`rst_to_markdown`."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()

        def visit(obj: Any) -> None:
            if id(obj) in seen or getattr(obj, "is_alias", False):
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(obj.docstring.value)
            for member in obj.members.values():
                visit(member)

        visit(pkg)
