"""Every command line's ``--help`` works on a CPU machine and prints plain text (no reST roles,
no double back-quotes, no internal references); ``--quick`` smoke runs refuse explicit options
they would change, write under ``runs/quick/`` and say that their numbers are not meaningful."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from recon.scripts import SMOKE_RUN, apply_quick, explicit_options, help_parser, plain_text

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(str(p.relative_to(ROOT)) for d in ("examples", "benchmarks") for p in (ROOT / d).glob("*.py"))
MODULES = ["recon.train", "recon.joint", "recon.tasks", "recon.evaluate"]
MARKUP = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|ref):`|``|\bissues? ?#?\d|\.\./shared")

# one interpreter prints every --help (torch is imported once): {target: [exit code, output]}
_RUNNER = r"""
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
out = {}
for target in sys.argv[1:]:
    buf = io.StringIO()
    code = 0
    sys.argv = [target, "--help"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code or 0
    except BaseException as exc:
        code, buf = 1, io.StringIO(buf.getvalue() + f"{type(exc).__name__}: {exc}")
    out[target] = [code, buf.getvalue()]
print("\n@@JSON@@" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _RUNNER, *SCRIPTS, *MODULES], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "@@JSON@@" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout.rsplit("@@JSON@@", 1)[1])


def test_every_script_is_listed():
    assert "benchmarks/distributed_cuda_check.py" in SCRIPTS and "examples/quickstart.py" in SCRIPTS
    assert len(SCRIPTS) >= 14


@pytest.mark.parametrize("target", SCRIPTS + MODULES)
def test_help_is_plain_text_and_works_without_a_gpu(helps, target):
    code, text = helps[target]
    assert code == 0, text[-2000:]
    assert text.lstrip().startswith("usage:"), text[:500]
    bad = MARKUP.findall(text)
    assert not bad, f"{target} --help shows {bad[:5]}"


def test_plain_text_removes_rest_markup():
    doc = ("Runs :func:`recon.training.fit` and :class:`~bilevel.HOAG` on ``x + y``.\n\n"
           "Usage::\n\n    python run.py\n")
    assert plain_text(doc) == "Runs recon.training.fit and HOAG on x + y.\n\nUsage:\n\n    python run.py"


def _parser():
    p = help_parser("Toy.")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/toy.json")
    p.add_argument("--quick", action="store_true")
    return p


def test_explicit_options_are_the_ones_on_the_command_line():
    p = _parser()
    assert explicit_options(p, ["--quick", "--epochs", "4"]) == {"quick", "epochs"}
    assert p.parse_args([]).epochs == 4          # defaults restored afterwards


def test_quick_sets_its_values_writes_under_runs_and_says_smoke_run():
    p = _parser()
    argv = ["--quick"]
    args = p.parse_args(argv)
    notes = apply_quick(p, args, argv, {"epochs": 1, "size": 16}, out="runs/quick/toy.json")
    assert (args.epochs, args.size, args.out) == (1, 16, "runs/quick/toy.json")
    assert notes[0] == SMOKE_RUN and "--epochs 1" in notes[1] and "runs/quick/toy.json" in notes[2]
    argv = ["--quick", "--out", "elsewhere.json", "--size", "16"]    # agrees with --quick: fine
    args = p.parse_args(argv)
    apply_quick(p, args, argv, {"epochs": 1, "size": 16}, out="runs/quick/toy.json")
    assert args.out == "elsewhere.json"


def test_quick_refuses_an_explicit_option_it_would_change(capsys):
    p = _parser()
    argv = ["--quick", "--epochs", "7"]
    with pytest.raises(SystemExit) as stop:
        apply_quick(p, p.parse_args(argv), argv, {"epochs": 1, "size": 16})
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--epochs 7" in err and "--quick" in err


@pytest.mark.parametrize("script, quick_out", [
    ("examples/ct_unrolling.py", "runs/quick/ct_unrolling"),
    ("examples/ct_joint.py", "runs/quick/ct_joint"),
])
def test_example_quick_defaults_to_runs_quick(script, quick_out, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(Path(script).stem + "_cli", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--quick"])
    assert args.out == quick_out and args.notes[0] == SMOKE_RUN
    with pytest.raises(SystemExit):
        module.parse_args(["--quick", "--epochs", "3"])
    assert "--epochs 3" in capsys.readouterr().err


def test_benchmark_quick_runs_never_default_to_the_committed_results():
    for name in ("distributed", "hypergradient", "operators"):
        text = (ROOT / "benchmarks" / f"{name}.py").read_text(encoding="utf-8")
        assert 'out=os.path.join("runs", "quick"' in text or 'Path("runs", "quick"' in text, name
        assert "print(SMOKE_RUN)" in text, name


def test_task_example_quick_settings(tmp_path):
    """--quick fills in the smoke settings, writes under runs/quick/, and keeps given options."""
    from recon.tasks.example import _prepare
    args = _prepare("classification", "stanford_dogs", ["--quick", "--threads", "1"], "Doc.")
    assert args.iters == 3 and str(args.out).startswith("runs/quick/")
    args = _prepare("classification", "stanford_dogs",
                    ["--quick", "--iters", "9", "--out", str(tmp_path / "o")], "Doc.")
    assert args.iters == 9 and args.n_train == 8
    assert isinstance(help_parser("x"), argparse.ArgumentParser)
