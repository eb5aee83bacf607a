"""``python -m recon.train {train,evaluate} ...`` and the names of the training API.

The code lives in :mod:`recon.training` (fit loop, experiment set-up, evaluation, command
line); this module re-exports its names so that ``from recon.train import fit`` keeps working.
"""

from .training import (ResumeMismatchError, TrainConfig, TrainResult, build_setup,
                       check_data_matches_operator, default_setup, fit, main, make_operator,
                       settings_differences, stack_dataset, train_from_args, validate)
# the helpers recon/train.py used to define, under their old names (noqa: F401, re-exports)
from .training.cli import _MODEL_ARGS  # noqa: F401
from .training.cli import add_train_arguments as _add_train_arguments  # noqa: F401
from .training.experiment import TensorData, _noise_model  # noqa: F401
from .training.loop import _end_of_epoch, _epoch_order, _lr_factor, _train_step  # noqa: F401
from .training.state import _plain, _rng_state, _set_rng_state  # noqa: F401
from .training.state import restore as _restore  # noqa: F401
from .training.state import training_state as _training_state  # noqa: F401

__all__ = ["TrainConfig", "TrainResult", "fit", "validate", "stack_dataset",
           "check_data_matches_operator", "default_setup", "make_operator", "build_setup", "main",
           "train_from_args", "ResumeMismatchError", "settings_differences"]

if __name__ == "__main__":
    import sys

    from .training.cli import console_main

    sys.exit(console_main())
