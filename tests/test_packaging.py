"""Packaging: one version for both packages, and ``python -m build`` makes a wheel that installs
and runs outside the source tree (the installed packages, not the checkout, are imported)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "bilevel", "recon")


def test_one_version_for_both_packages():
    import bilevel
    import recon
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "version" in meta.get("dynamic", []) and "version" not in meta
    assert re.fullmatch(r"\d+\.\d+\.\d+", bilevel.__version__)
    assert recon.__version__ == bilevel.__version__
    cff = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert f"version: {bilevel.__version__}\n" in cff
    assert f"## [{bilevel.__version__}]" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert meta["license"]["text"] == "MIT" and "MIT License" in (ROOT / "LICENSE").read_text()


@pytest.mark.skipif(importlib.util.find_spec("build") is None,
                    reason="the 'build' package is not installed (pip install -e '.[test]')")
def test_wheel_builds_installs_and_runs_outside_the_checkout(tmp_path):
    import bilevel
    src = tmp_path / "src"          # a copy, so the build leaves no build/ or egg-info behind
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    dist = tmp_path / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                           "--outdir", str(dist), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    assert f"-{bilevel.__version__}-" in wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "bilevel/__init__.py" in names and "recon/operators/__init__.py" in names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)

    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                           "--quiet", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"}
    check = ("import bilevel, recon, recon.operators, recon.problems; "
             "print(bilevel.__file__); print(recon.__version__)")
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    where, version = done.stdout.split()
    assert Path(where).is_relative_to(target) and version == bilevel.__version__
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--help"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
