"""``python -m recon.evaluate CKPT ...`` (same as ``python -m recon.train evaluate``).

The code lives in :mod:`recon.training.evaluation` (tables, timing, loading checkpoints) and
:mod:`recon.training.cli` (the command line); this module re-exports the names it used to
define so that ``from recon.evaluate import time_methods`` keeps working.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from .training.cli import add_evaluate_arguments as add_arguments
from .training.cli import run_evaluate as run
from .training.evaluation import (LABELS, Method, evaluate_methods, format_table, load_methods,
                                  save_samples_png, time_methods)
from .training.evaluation import _acquisition, _fbp_method, _sync  # noqa: F401 (old names)

__all__ = ["Method", "LABELS", "evaluate_methods", "time_methods", "format_table",
           "save_samples_png", "load_methods", "add_arguments", "run", "main"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` as ``python -m recon.train evaluate`` does and run the evaluation."""
    parser = argparse.ArgumentParser(prog="python -m recon.evaluate",
                                     description="Evaluate checkpoints of python -m recon.train")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    from .training.cli import console_main

    sys.exit(console_main(prog="python -m recon.evaluate", entry=main))
