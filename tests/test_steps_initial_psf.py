"""Tests of steps/initial_psf.py beyond the detection-step tests: candidate search and sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from singleframe.psf import GaussianPsf
from singleframe.steps.initial_psf import InitialPsfConfig, estimate_initial_psf

SHAPE = (260, 330)  # non-square


def _scene(seed: int, var: np.ndarray, sigma: float = 1.7, n: int = 12):
    rng = np.random.default_rng(seed)
    img = np.zeros(SHAPE)
    gx, gy = np.meshgrid(np.linspace(40, SHAPE[1] - 40, 4), np.linspace(40, SHAPE[0] - 40, 3))
    xs = gx.ravel()[:n] + rng.uniform(-0.5, 0.5, n)
    ys = gy.ravel()[:n] + rng.uniform(-0.5, 0.5, n)
    k = GaussianPsf(sigma).images(xs, ys, size=31, centered=False)
    for x, y, stamp in zip(xs, ys, k, strict=True):
        cx, cy = int(round(x)), int(round(y))
        img[cy - 15:cy + 16, cx - 15:cx + 16] += 4e4 * stamp
    img += rng.normal(size=SHAPE) * np.sqrt(np.maximum(var, 0.0))
    return img.astype(np.float32)


def _brute_force_candidates(img, var, config):
    """Isolated strict 3x3 maxima above the S/N cut, by a whole-image computation."""
    h = config.stamp_half_size_pix
    ok = (img > 0) & (img * img > np.float32(config.min_peak_snr**2) * var)
    ok[:h, :] = ok[-h:, :] = False
    ok[:, :h] = ok[:, -h:] = False
    mx = ndimage.maximum_filter(img, size=3, mode="constant", cval=-np.inf)
    ok &= img == mx
    ys, xs = np.nonzero(ok)
    d = np.hypot(xs[:, None] - xs[None, :], ys[:, None] - ys[None, :])
    return int(np.sum((d <= config.isolation_radius_pix).sum(axis=1) == 1))


@pytest.mark.parametrize("low_var", [25.0, 0.0, -1.0])
def test_candidate_search_with_uneven_and_degenerate_variance(low_var):
    # The S/N pre-selection uses the smallest variance: a patch of low, zero or negative
    # variance must not hide or invent candidates elsewhere.
    var = np.full(SHAPE, 100.0, np.float32)
    var[:, SHAPE[1] // 2:] = 400.0
    var[100:110, 5:15] = low_var  # outside the candidate area (within stamp_half_size of the edge)
    img = _scene(3, var)
    config = InitialPsfConfig(min_stars=5, wide_psf_box_pix=1)
    res = estimate_initial_psf(img, var, np.zeros(SHAPE, np.uint32), config=config, origin=(7, 11))
    assert res.n_candidates == _brute_force_candidates(img, var, config)
    # Pixelised sigma-1.7 stars at S/N > 100: the cluster centre is within 1 %.
    assert res.sigma_pix == pytest.approx(1.7, rel=0.01)
    assert math.isfinite(res.sigma_pix) and res.n_stars >= 5
