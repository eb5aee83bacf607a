"""Networks: the learned primal-dual family (LPD, LSPD, sketched LSPD), a compact U-Net and
torchvision ResNet classifiers (``resnet_classifier``; torchvision is imported on first call);
``FastInference`` / ``FastTrainStep`` run them with bf16 autocast, channels-last,
``torch.compile`` or CUDA graphs; ``recompute_batchnorm`` sets a trained network's batch-norm
statistics to their exact means at the final weights."""

from .batchnorm import recompute_batchnorm
from .blocks import ResidualConvBlock
from .unrolled import (LSPD, MODELS, LearnedPrimalDual, SketchedLSPD, UnrolledPrimalDual,
                       build_model)
from .classifiers import resnet_classifier
from .fast import BF16_RTOL, PRECISIONS, FastInference, FastTrainStep
from .unet import UNet

__all__ = ["ResidualConvBlock", "UnrolledPrimalDual", "LearnedPrimalDual", "LSPD",
           "SketchedLSPD", "MODELS", "build_model", "UNet", "resnet_classifier",
           "FastInference", "FastTrainStep", "PRECISIONS", "BF16_RTOL", "recompute_batchnorm"]
