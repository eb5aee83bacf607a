"""Reconstruction networks: the learned primal-dual family (LPD, LSPD, sketched LSPD)."""

from .blocks import ResidualConvBlock
from .unrolled import (LSPD, MODELS, LearnedPrimalDual, SketchedLSPD, UnrolledPrimalDual,
                       build_model)

__all__ = ["ResidualConvBlock", "UnrolledPrimalDual", "LearnedPrimalDual", "LSPD",
           "SketchedLSPD", "MODELS", "build_model"]
