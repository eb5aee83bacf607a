"""Figures are legible: every figure the docs show is stored at ≥ 100 dpi, and the code that draws
figures (tutorial pages, examples, benchmarks, library plots) asks for dpi ≥ 100 and font sizes
≥ 9 pt wherever it sets them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MIN_DPI, MIN_FONT = 100, 9
SOURCES = sorted([*ROOT.glob("docs/tutorials/*.md"), *ROOT.glob("docs/*.py"),
                  *ROOT.glob("examples/*.py"), *ROOT.glob("benchmarks/*.py"),
                  *ROOT.glob("recon/**/*.py"), *ROOT.glob("bilevel/*.py")])
DPI = re.compile(r"\bdpi\s*=\s*(\d+(?:\.\d+)?)")
FONT = re.compile(r"\b(?:fontsize|labelsize|font\.size\"?\s*:?)\s*=?\s*(\d+(?:\.\d+)?)")
SHOWN = re.compile(r"!\[[^\]]*\]\((?P<path>[^)\s]+\.png)\)")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_figure_code_asks_for_legible_sizes(source):
    text = source.read_text(encoding="utf-8")
    small_dpi = [float(v) for v in DPI.findall(text) if float(v) < MIN_DPI]
    small_font = [float(v) for v in FONT.findall(text) if float(v) < MIN_FONT]
    assert not small_dpi, f"dpi {small_dpi} (need ≥ {MIN_DPI})"
    assert not small_font, f"font sizes {small_font} pt (need ≥ {MIN_FONT})"


def _shown_figures():
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for m in SHOWN.finditer(page.read_text(encoding="utf-8")):
            yield pytest.param((page.parent / m["path"]).resolve(),
                               id=f"{page.relative_to(ROOT)}:{m['path']}")


@pytest.mark.parametrize("figure", list(_shown_figures()))
def test_figures_in_the_docs_are_stored_at_100_dpi_or_more(figure):
    from PIL import Image
    assert figure.is_file(), figure
    with Image.open(figure) as im:
        dpi = im.info.get("dpi", (0, 0))
        assert min(dpi) >= MIN_DPI - 0.5, f"{figure.name}: {dpi} dpi, {im.size} px"
