"""``python -m recon.train {train,evaluate} ...`` and the names of the training API.

The code lives in :mod:`recon.training` (fit loop, experiment set-up, evaluation, command
line); this module re-exports its names so that ``from recon.train import fit`` keeps working.
"""

from .training import (ResumeMismatchError, TrainConfig, TrainResult, build_setup,
                       check_data_matches_operator, default_setup, fit, main, make_operator,
                       settings_differences, stack_dataset, train_from_args, validate)
from .training.cli import add_train_arguments as _add_train_arguments  # noqa: F401 (old name)

__all__ = ["TrainConfig", "TrainResult", "fit", "validate", "stack_dataset",
           "check_data_matches_operator", "default_setup", "make_operator", "build_setup", "main",
           "train_from_args", "ResumeMismatchError", "settings_differences"]

if __name__ == "__main__":
    import sys

    from .training.cli import console_main

    sys.exit(console_main())
