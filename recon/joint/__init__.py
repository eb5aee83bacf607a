r"""Joint task-adapted CT: reconstruction ``R_φ`` and segmentation ``S_ψ`` trained together.

``L = (1 − C)·MSE(R_φ(y), x) + C·(CE + Dice)(S_ψ(R_φ(y)), s)`` (:class:`JointLoss`), trained by
:func:`fit_joint`. It is the special case of the bilevel API with an explicit solution map
``x̂(φ) = R_φ(y)`` (:class:`ExplicitReconstruction`) differentiated by backpropagation
(:class:`ExplicitBackprop`); task-driven variational CT (:func:`learn_tv_theta`) learns the
smoothed-TV parameters of :class:`recon.problems.VariationalCT` with HOAG.

Command line: ``python -m recon.joint train|evaluate ...`` (see :mod:`recon.joint.cli`);
``examples/ct_joint.py`` prints the Table 3.2 analog.
"""
from .data import build_joint_data, check_joint_data, default_joint_setup
from .losses import JointLoss, check_masks, check_weight, mask_labels
from .problem import ExplicitBackprop, ExplicitReconstruction, network_theta
from .routes import (ROUTES, build_reconstructor, build_segmenter, default_model_options,
                     evaluate_net, lesion_prior, predict, run_route)
from .trainer import JointConfig, JointNet, JointTrainResult, fit_joint, joint_gradients
from .variational import TV_BOUNDS, TV_THETA0, learn_tv_theta, tv_reconstruct

__all__ = [
    "JointLoss", "check_masks", "check_weight", "mask_labels",
    "ExplicitReconstruction", "ExplicitBackprop", "network_theta",
    "JointConfig", "JointNet", "JointTrainResult", "fit_joint", "joint_gradients",
    "ROUTES", "default_model_options", "build_reconstructor", "build_segmenter", "run_route",
    "evaluate_net", "predict", "lesion_prior",
    "default_joint_setup", "build_joint_data", "check_joint_data",
    "learn_tv_theta", "tv_reconstruct", "TV_THETA0", "TV_BOUNDS",
]
