"""Metrics against scikit-image and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from recon.metrics import accuracy, dice, iou, mse, psnr, ssim


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 2), h=st.integers(11, 40), w=st.integers(11, 40),
       noise=st.floats(0.01, 0.5), seed=st.integers(0, 2**16), fixed_range=st.booleans())
def test_psnr_and_ssim_agree_with_skimage(b, c, h, w, noise, seed, fixed_range):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.rand(b, c, h, w, generator=gen, dtype=torch.float64)
    x = (ref + noise * torch.randn(ref.shape, generator=gen, dtype=torch.float64)).float()
    dr = 1.0 if fixed_range else None
    ours_p, ours_s, ours_g = psnr(x, ref, dr), ssim(x, ref, dr), ssim(x, ref, dr, gaussian=True)
    for i in range(b):
        r, t = ref[i].numpy(), x[i].double().numpy()
        rng = 1.0 if fixed_range else float(r.max() - r.min())
        assert abs(float(ours_p[i]) - peak_signal_noise_ratio(r, t, data_range=rng)) < 1e-6
        sk = structural_similarity(r, t, data_range=rng, channel_axis=0)
        assert abs(float(ours_s[i]) - sk) < 1e-3
        skg = structural_similarity(r, t, data_range=rng, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert abs(float(ours_g[i]) - skg) < 1e-3


def test_psnr_conventions():
    ref = torch.zeros(2, 1, 4, 4)
    ref[:, :, 0, 0] = 2.0
    x = ref + 0.1
    torch.testing.assert_close(mse(x, ref), torch.full((2,), 0.01, dtype=torch.float64))
    torch.testing.assert_close(psnr(x, ref), torch.full((2,), 10 * math.log10(4 / 0.01), dtype=torch.float64))
    torch.testing.assert_close(psnr(x[0, 0], ref[0, 0], data_range=1.0),
                               torch.tensor(20.0, dtype=torch.float64))
    assert math.isinf(float(psnr(ref, ref)[0]))
    img = torch.rand(9, 9)
    assert float(ssim(img, img, data_range=1.0)) == pytest.approx(1.0)


def test_metric_errors():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), data_range=-1.0)
    with pytest.raises(ValueError, match="smaller than the 7x7"):
        ssim(torch.zeros(1, 5, 5), torch.zeros(1, 5, 5), 1.0)
    with pytest.raises(ValueError, match="win_size"):
        ssim(torch.zeros(1, 9, 9), torch.zeros(1, 9, 9), 1.0, win_size=4)


def test_dice_and_iou_by_hand():
    target = torch.zeros(3, 1, 4, 4)
    pred = torch.zeros(3, 1, 4, 4)
    target[0, 0, :2, :2] = 1  # 4 pixels
    pred[0, 0, :2, :1] = 0.9  # 2 pixels, both inside
    pred[0, 0, 3, 3] = 0.8  # 1 false positive
    target[1, 0, 0, 0] = 1  # prediction empty
    # sample 2: both empty
    torch.testing.assert_close(dice(pred, target), torch.tensor([2 * 2 / 7, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(iou(pred, target), torch.tensor([2 / 5, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(dice(pred, target, threshold=0.85), torch.tensor([2 * 2 / 6, 0.0, 1.0],
                                                                                dtype=torch.float64))
    d, j = float(dice(pred, target)[0]), float(iou(pred, target)[0])
    assert d == pytest.approx(2 * j / (1 + j))


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert float(accuracy(logits, torch.tensor([0, 1, 1]))) == pytest.approx(2 / 3)
    assert float(accuracy(torch.tensor([1, 1]), torch.tensor([1, 0]))) == 0.5
    with pytest.raises(ValueError, match="does not match"):
        accuracy(torch.tensor([1, 1, 1]), torch.tensor([1, 0]))


def test_metrics_numpy_reference_for_one_image():
    rng = np.random.default_rng(0)
    ref = rng.random((32, 32))
    x = ref + 0.05 * rng.standard_normal((32, 32))
    ours = float(ssim(torch.from_numpy(x), torch.from_numpy(ref), data_range=1.0))
    assert abs(ours - structural_similarity(ref, x, data_range=1.0)) < 1e-3
