"""Imaging on top of :mod:`bilevel`: CT physics, regularizers, variational problems, unrolled
networks, task losses, metrics and data sets. Submodules load on first use."""
import importlib

__all__ = ["operators", "data", "metrics", "models", "regularizers", "problems", "experts",
           "losses", "io", "checkpoint", "training", "train", "joint", "tasks"]


def __getattr__(name):
    if name == "__version__":          # one version for both packages: bilevel's
        return importlib.import_module("bilevel").__version__
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
