"""benchmarks/lpd_recipe.py --quick trains and measures its variants and writes its report."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import lpd_recipe  # noqa: E402


def test_quick_run_reports_every_variant(capsys):
    report = lpd_recipe.main(["--quick", "--variants", "base", "lr3e-3"])
    assert [r["variant"] for r in report["rows"]] == ["base", "lr3e-3"]
    for row in report["rows"]:
        for part in ("test", "real"):
            g = row[part]
            assert math.isfinite(g["gain"]) and abs(g["gain"] - (g["lpd"] - g["fbp"])) < 1e-9
    assert report["rows"][1]["training"] == {"lr": 3e-3}
    out = capsys.readouterr().out
    path = Path(out.split("wrote ", 1)[1].split()[0])
    assert json.loads(path.read_text())["rows"][0]["variant"] == "base"
    assert "numbers mean nothing" in out
