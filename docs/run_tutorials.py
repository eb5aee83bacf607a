"""Run the code of the tutorial pages, as a reader would, and collect their figures.

    python docs/run_tutorials.py                 # full settings; copies figures into docs/tutorials/figures
    python docs/run_tutorials.py --quick PAGE.md # small settings (what the docs test runs)

Every fenced ``python`` block of a page runs, in order, in one namespace; every ``bash`` block
runs in ``bash -euo pipefail`` with this interpreter first on ``PATH``. Both run in a scratch
folder (the page's figures are written there). With ``--in-process``, the ``python -m MODULE
...`` and ``cp`` commands of the bash blocks are recorded by bash (variables expanded) and then
replayed in this interpreter, in order (no new interpreter per command). With ``--quick``, a line
``NAME = value  # quick: other`` (or ``NAME=value  # quick: other`` in bash) runs as
``NAME = other``. Every image a page shows (``![...](figures/NAME.png)``) must exist in the
scratch folder afterwards.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
TUTORIALS = DOCS / "tutorials"
_FENCE = re.compile(r"^```(?P<lang>[A-Za-z]*)[^\n]*\n(?P<body>.*?)^```\s*$", re.M | re.S)
_QUICK = re.compile(r"^(?P<lhs>\s*[A-Za-z_][A-Za-z_0-9]*\s*=\s*)\S.*?\s*#\s*quick:\s*(?P<new>.+?)\s*$")
_FIGURE = re.compile(r"!\[[^\]]*\]\(figures/(?P<name>[^)]+)\)")


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of the page's ``python`` and ``bash`` blocks, in order."""
    text = page.read_text(encoding="utf-8")
    return [(m["lang"], m["body"]) for m in _FENCE.finditer(text) if m["lang"] in ("python", "bash")]


def figures(page: Path) -> list[str]:
    """File names of the figures the page shows (``figures/NAME``)."""
    return _FIGURE.findall(page.read_text(encoding="utf-8"))


def quick(code: str) -> str:
    """Apply the ``# quick:`` substitutions."""
    return "\n".join(_QUICK.sub(lambda m: m["lhs"] + m["new"], line) for line in code.splitlines())


@contextlib.contextmanager
def _in_folder(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


_RECORD = r"""
python() { printf '%s\x1f' python "$@" >> .commands; printf '\n' >> .commands; }
cp() { printf '%s\x1f' cp "$@" >> .commands; printf '\n' >> .commands; }
"""


def _replay(code: str, env: dict) -> None:
    """Record the block's ``python``/``cp`` commands with bash, then run them here."""
    Path(".commands").unlink(missing_ok=True)
    subprocess.run(["bash", "-euo", "pipefail", "-c", _RECORD + code], check=True, env=env)
    commands = Path(".commands").read_text(encoding="utf-8").splitlines()
    Path(".commands").unlink()
    for line in commands:
        argv = line.split("\x1f")[:-1]
        if argv[0] == "cp" and len(argv) == 3:
            shutil.copy(argv[1], argv[2])
        elif argv[:2] == ["python", "-m"] and len(argv) >= 3:
            old = sys.argv
            sys.argv = [argv[2], *argv[3:]]
            try:
                with warnings.catch_warnings():  # the module may be imported already: fine
                    warnings.filterwarnings("ignore", message=".*found in sys.modules",
                                            category=RuntimeWarning)
                    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
            except SystemExit as stop:
                if stop.code not in (None, 0):
                    raise RuntimeError(f"{' '.join(argv)} exited with status {stop.code}") from None
            finally:
                sys.argv = old
        else:
            raise ValueError(f"cannot replay {argv!r} in-process (only python -m ... and cp)")


def run_page(page: Path, workdir: Path, small: bool = False, in_process: bool = False) -> list[Path]:
    """Run the page's blocks in ``workdir``; return the paths of the figures it shows."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    namespace: dict = {"__name__": "__main__"}
    with _in_folder(workdir):
        for i, (lang, code) in enumerate(code_blocks(page)):
            code = quick(code) if small else code
            if lang == "python":
                exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
            elif in_process:
                _replay(code, env)
            else:
                subprocess.run(["bash", "-euo", "pipefail", "-c", code], check=True, env=env)
        import matplotlib.pyplot as plt
        plt.close("all")
    missing = [f for f in figures(page) if not (workdir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{page.name}: the code did not write {missing}")
    return [workdir / f for f in figures(page)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pages", nargs="*", help="pages (default: every docs/tutorials/*.md)")
    ap.add_argument("--quick", action="store_true", help="small settings; figures not copied")
    ap.add_argument("--in-process", action="store_true", help="replay bash commands here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    pages = [Path(p).resolve() for p in args.pages] or sorted(TUTORIALS.glob("*.md"))
    for page in pages:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"== {page.name}", flush=True)
            made = run_page(page, Path(tmp), small=args.quick, in_process=args.in_process)
            if not args.quick:
                (TUTORIALS / "figures").mkdir(exist_ok=True)
                for f in made:
                    shutil.copyfile(f, TUTORIALS / "figures" / f.name)
                    print(f"   wrote docs/tutorials/figures/{f.name}")


if __name__ == "__main__":
    main()
