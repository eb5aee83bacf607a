"""CT operators: geometries, the differentiable ray transform and filtered back projection.

>>> from recon.operators import ParallelBeamGeometry, RayTransform, fbp, subset_data
>>> A = RayTransform(ParallelBeamGeometry((128, 128), n_angles=60))
>>> y = A(x)                      # (B, C, 60, 182) sinograms of x: (B, C, 128, 128)
>>> x_fbp = fbp(y, A, filter="hann")

Conventions (coordinates, units, angles) are in :mod:`recon.operators.geometry`;
backends in :mod:`recon.operators.ray_transform`.
"""

from .fbp import FILTERS, fbp, ramp_filter
from .geometry import FanBeamGeometry, Geometry, ParallelBeamGeometry
from .linear import LinearOperator, adjointness_test
from .ray_transform import BACKENDS, AdjointRayTransform, RayTransform, subset_data

__all__ = [
    "Geometry",
    "LinearOperator",
    "adjointness_test",
    "ParallelBeamGeometry",
    "FanBeamGeometry",
    "RayTransform",
    "AdjointRayTransform",
    "subset_data",
    "fbp",
    "ramp_filter",
    "FILTERS",
    "BACKENDS",
    "available_backends",
]


def available_backends() -> tuple[str, ...]:
    """Backends usable in this environment (``"torch"`` always; ASTRA/ODL if importable)."""
    from ._astra_backend import astra_available
    from ._odl_backend import odl_available

    out = ["torch"]
    if astra_available():
        out.append("astra")
    if odl_available():
        out.append("odl")
    return tuple(out)
