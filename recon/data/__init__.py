"""Data: phantoms with lesion masks, noise models, digits, DICOM slices, simulated CT data sets.

>>> from recon.data import EllipsePhantomDataset, PoissonNoise
>>> from recon.operators import ParallelBeamGeometry
>>> ds = EllipsePhantomDataset(100, 128, ParallelBeamGeometry((128, 128), n_angles=60),
...                            noise=PoissonNoise(7e4, mu_scale=4 / 128), lesions=True)
>>> item = ds[0]      # {"image", "sinogram", "fbp", "mask"}
"""

from .anatomy import LAYOUTS, anatomy_phantom
from .ct_datasets import (AnatomyPhantomDataset, DicomSliceDataset, DigitsDataset,
                          EllipsePhantomDataset, SimulatedCTDataset)
from .dicom import (MU_WATER, DicomSlice, attenuation_to_hu, example_ct_path, find_dicom_files,
                    hu_to_attenuation, read_dicom_slice)
from .digits import load_digits_images
from .natural_images import BUNDLED, denoising_batch, image_patches, load_bundled_image
from .noise import GaussianNoise, PoissonNoise, as_noise_model, select_views
from .phantoms import ellipse_phantom, lesion_phantom, random_ellipses, render_ellipses, shepp_logan

__all__ = [
    "SimulatedCTDataset", "EllipsePhantomDataset", "AnatomyPhantomDataset", "DigitsDataset",
    "DicomSliceDataset", "anatomy_phantom", "LAYOUTS",
    "GaussianNoise", "PoissonNoise", "as_noise_model", "select_views",
    "ellipse_phantom", "lesion_phantom", "random_ellipses", "render_ellipses", "shepp_logan",
    "load_digits_images",
    "BUNDLED", "denoising_batch", "image_patches", "load_bundled_image",
    "DicomSlice", "read_dicom_slice", "find_dicom_files", "hu_to_attenuation", "attenuation_to_hu",
    "example_ct_path", "MU_WATER",
]
