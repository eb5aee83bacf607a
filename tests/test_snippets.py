"""Every ``python`` block of the README and of the documentation runs as pasted: each block in a
fresh interpreter, in an empty folder, with only the library installed. A block that is a
fragment on purpose is marked by an HTML comment ``<!-- fragment -->`` on the line before it and
is only compiled. The tutorial pages are scripts whose blocks run in order in one namespace:
``tests/test_docs.py`` runs each of them as a whole, so here they are only compiled."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[A-Za-z]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)
FRAGMENT = "<!-- fragment -->"
TUTORIALS = ROOT / "docs" / "tutorials"


def pages() -> list[Path]:
    found = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in found if "vendor" not in p.parts]


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """``(line, code, is_fragment)`` of every ``python`` block of ``page``."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        if m["lang"] != "python":
            continue
        before = [ln.strip() for ln in text[:m.start()].splitlines() if ln.strip()]
        body = "\n".join(ln[len(m["indent"]):] for ln in m["body"].splitlines())
        blocks.append((text.count("\n", 0, m.start()) + 1, body,
                       bool(before) and before[-1] == FRAGMENT))
    return blocks


def _cases():
    for page in pages():
        for line, code, fragment in python_blocks(page):
            rel = page.relative_to(ROOT)
            yield pytest.param(page, code, fragment, id=f"{rel}:{line}")


CASES = list(_cases())


def test_the_readme_and_the_docs_have_python_blocks():
    readme = [c for c in CASES if c.values[0].name == "README.md"]
    assert readme and not any(c.values[2] for c in readme), "the README's example must run"
    assert len(CASES) > 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("page, code, fragment", CASES)
def test_python_block_runs_as_pasted(page, code, fragment, tmp_path):
    compile(code, str(page), "exec")
    if fragment or TUTORIALS in page.parents:
        return                      # compiled only (tutorials: run as whole pages in test_docs)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               MASTER_PORT=str(_free_port()), CUDA_VISIBLE_DEVICES="")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{page.name}:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"
    if "print(res.success" in code:   # the ten-line example says it stops by itself
        assert done.stdout.split()[:1] == ["True"], done.stdout
