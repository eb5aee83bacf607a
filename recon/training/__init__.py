"""Training and evaluation of the unrolled reconstruction networks.

- :mod:`.loop`: the fit loop (:func:`fit`, :class:`TrainConfig`, checkpoints, resume);
- :mod:`.experiment`: experiment settings, operator and simulated data (:func:`build_setup`);
- :mod:`.evaluation`: PSNR / SSIM / timing tables of methods (:func:`evaluate_methods`);
- :mod:`.cli`: the command line ``python -m recon.train {train,evaluate}``.

Dependencies run one way: ``cli -> evaluation, loop -> experiment``.
"""

from .cli import add_evaluate_arguments, add_train_arguments, main, run_evaluate, train_from_args
from .evaluation import (LABELS, Method, evaluate_methods, format_table, load_methods,
                         save_samples_png, time_methods)
from .experiment import (TensorData, build_setup, check_data_matches_operator, default_setup,
                         make_operator, stack_dataset)
from .loop import (ResumeMismatchError, TrainConfig, TrainResult, fit, settings_differences,
                   validate)

__all__ = ["TrainConfig", "TrainResult", "ResumeMismatchError", "fit", "validate",
           "settings_differences", "TensorData", "stack_dataset", "check_data_matches_operator",
           "default_setup", "make_operator", "build_setup", "Method", "LABELS",
           "evaluate_methods", "time_methods", "format_table", "save_samples_png",
           "load_methods", "add_train_arguments", "add_evaluate_arguments", "train_from_args",
           "run_evaluate", "main"]
